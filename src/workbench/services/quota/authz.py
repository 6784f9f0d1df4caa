"""Who may read which usage, and who may write events (pure).

- Every user reads their own usage, and the totals of their own groups.
- Instructors (``groups.<course>.instructors`` in the policy) read their course: its totals,
  its per-student breakdown, and each student's usage charged to that course, nothing else.
- Hub admins, and tokens with :data:`READ_ALL_SCOPE`, read everything.
- Anybody else gets 403. Per-user breakdowns of a group are never shown to plain members.
- Events, admissions and reconciles need :data:`WRITE_SCOPE` (granted by role to the hub's and
  the gateway's service tokens); ``/metrics`` needs JupyterHub's own ``read:metrics`` scope.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.names import QUOTA_ACCESS_SCOPE as ACCESS_SCOPE  # noqa: F401 - the service's names
from workbench.names import QUOTA_CUSTOM_SCOPES as CUSTOM_SCOPES  # noqa: F401
from workbench.names import QUOTA_METRICS_SCOPE as METRICS_SCOPE  # noqa: F401
from workbench.names import QUOTA_READ_ALL_SCOPE as READ_ALL_SCOPE
from workbench.names import QUOTA_SERVICE as SERVICE_NAME  # noqa: F401
from workbench.names import QUOTA_WRITE_SCOPE as WRITE_SCOPE
from workbench.policy import Policy


class Forbidden(Exception):
    """The viewer may not read this; the message says why (without revealing usage)."""


@dataclass(frozen=True)
class Viewer:
    """Who asks, as JupyterHub identified their token."""

    name: str
    kind: str = "user"  # user | service
    admin: bool = False
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()

    @classmethod
    def from_model(cls, model: dict, groups: list[str] | None = None) -> Viewer:
        return cls(
            name=model["name"],
            kind=model.get("kind", "user"),
            admin=bool(model.get("admin")),
            groups=frozenset(groups if groups is not None else model.get("groups") or []),
            scopes=frozenset(model.get("scopes") or []),
        )

    @property
    def reads_all(self) -> bool:
        return self.admin or READ_ALL_SCOPE in self.scopes

    @property
    def writes(self) -> bool:
        return WRITE_SCOPE in self.scopes

    @property
    def reads_metrics(self) -> bool:
        return self.admin or METRICS_SCOPE in self.scopes


def instructed_courses(policy: Policy, name: str) -> set[str]:
    return {g for g, group in policy.groups.items() if group.kind == "course" and name in group.instructors}


def can_read_group(policy: Policy, viewer: Viewer, group: str) -> bool:
    """Totals of ``group``: its members, its instructors, admins."""
    if viewer.reads_all:
        return True
    if viewer.kind != "user":
        return False
    return group in viewer.groups or group in instructed_courses(policy, viewer.name)


def can_read_members(policy: Policy, viewer: Viewer, group: str) -> bool:
    """The per-user breakdown of ``group``: admins, and the instructors of a course."""
    if viewer.reads_all:
        return True
    return viewer.kind == "user" and group in instructed_courses(policy, viewer.name)


def user_scope(policy: Policy, viewer: Viewer, target: str, target_groups: list[str]) -> set[str] | None:
    """Which of ``target``'s usage ``viewer`` may read: None for all of it, else the groups it is limited to.

    Raises :class:`Forbidden` when the viewer may read none of it.
    """
    if viewer.reads_all or (viewer.kind == "user" and viewer.name == target):
        return None
    shared = {g for g in target_groups if can_read_members(policy, viewer, g)}
    if shared:
        return shared
    raise Forbidden(f"{viewer.name} may not read the usage of {target}")


def check_group(policy: Policy, viewer: Viewer, group: str) -> None:
    if not can_read_group(policy, viewer, group):
        raise Forbidden(f"{viewer.name} may not read the usage of group {group}")
