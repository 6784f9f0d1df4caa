"""Hub settings every engine shares: roles generated from the policy, and applying ``{section: {trait: value}}``.

The embedded hub (:mod:`workbench.embedded.hub`) and the Kubernetes hub (:mod:`workbench.kubernetes.hub`) both
build their settings with these pure functions.
"""

from __future__ import annotations

from workbench.names import (
    GATEWAY_ACCESS_SCOPE,
    ROSTERS_ACCESS_SCOPE,
    ROSTERS_SERVICE,
    SESSIONS_ACCESS_SCOPE,
    SESSIONS_SCOPES,
    SESSIONS_SERVICE,
)
from workbench.policy import Policy
from workbench.services.rosters.rules import needs_service as needs_rosters_service
from workbench.services.rosters.rules import service_scopes as rosters_service_scopes
from workbench.services.sessions.rules import needs_service as needs_sessions_service

#: what an instructor may do, each scope filtered to their course's group
INSTRUCTOR_SCOPES = [
    "list:users",
    "read:users",
    "read:users:activity",
    "servers",
    "access:servers",
    "read:groups",
    "list:groups",
]


def course_roles(policy: Policy) -> list[dict]:
    """One role per course with instructors: their powers, filtered with ``!group=<course>`` (pure).

    They may also call the roster service (:mod:`workbench.services.rosters.app`), which loads their course's
    roster with its own token: instructors never get scopes to change groups or create users.
    """
    return [
        {
            "name": f"instructor-{name}",
            "description": f"Instructors of {name}: list, start, stop and open their students' servers, load rosters",
            "scopes": [*(f"{scope}!group={name}" for scope in INSTRUCTOR_SCOPES), ROSTERS_ACCESS_SCOPE],
            "users": list(group.instructors),
        }
        for name, group in policy.groups.items()
        if group.kind == "course" and group.instructors
    ]


def roles(policy: Policy) -> list[dict]:
    """Roles generated from the policy (pure)."""
    dask_groups = [name for name, g in policy.groups.items() if g.dask is not None]
    return [
        {
            "name": "workbench-dask-users",
            "description": "May use the Dask Gateway (groups with a dask policy)",
            "scopes": [GATEWAY_ACCESS_SCOPE],
            "groups": dask_groups,
        },
        # the sessions service (workbench.services.sessions.app): session limits and idle culling
        *(
            [
                {
                    "name": "workbench-sessions",
                    "description": "Stop servers at their session limit and when idle (workbench.services.sessions.app)",
                    "scopes": list(SESSIONS_SCOPES),
                    "services": [SESSIONS_SERVICE],
                },
                {
                    "name": "workbench-sessions-users",
                    "description": "May read their own notifications (session limits, stopped servers)",
                    "scopes": [SESSIONS_ACCESS_SCOPE],
                    "groups": list(policy.groups),
                },
            ]
            if needs_sessions_service(policy)
            else []
        ),
        # the roster service (workbench.services.rosters.app): create students, change the course groups only
        *(
            [
                {
                    "name": "workbench-rosters",
                    "description": "Load course rosters for instructors and admins (workbench.services.rosters.app)",
                    "scopes": rosters_service_scopes(policy),
                    "services": [ROSTERS_SERVICE],
                }
            ]
            if needs_rosters_service(policy)
            else []
        ),
        *course_roles(policy),
    ]


def apply_settings(c, settings: dict[str, dict]) -> None:
    for section, values in settings.items():
        for key, value in values.items():
            setattr(c[section], key, value)
