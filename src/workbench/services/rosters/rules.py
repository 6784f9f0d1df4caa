"""What the rosters service needs from the policy (pure; the hub imports this, never the service)."""

from __future__ import annotations

from workbench.policy import Policy


def course_names(policy: Policy) -> list[str]:
    return [name for name, group in policy.groups.items() if group.kind == "course"]


def needs_service(policy: Policy) -> bool:
    """The service runs when the policy has a course."""
    return bool(course_names(policy))


def service_scopes(policy: Policy) -> list[str]:
    """Scopes of the service's own token: create users, change the course groups only (pure)."""
    return ["admin:users", *(f"groups!group={c}" for c in course_names(policy))]
