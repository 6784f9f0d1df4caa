"""Names every engine shares: the hub services of the platform and the scopes that reach them.

One place for them, so the embedded hub, the Kubernetes hub, the services and the single-user servers agree
without importing each other (a hub process imports this module, never a service's code).
"""

from __future__ import annotations

#: the hub service in front of dask-gateway (the dashboard guard; ``/services/dask-gateway``)
GATEWAY_SERVICE = "dask-gateway"
#: the hub-managed service running dask-gateway-server (no URL: the `dask-gateway` guard fronts it)
GATEWAY_SERVER_SERVICE = "dask-gateway-server"
GATEWAY_ACCESS_SCOPE = f"access:services!service={GATEWAY_SERVICE}"

#: jupyterhub-idle-culler (Kubernetes, when the sessions service is off)
CULLER_SERVICE = "idle-culler"
#: what jupyterhub-idle-culler needs
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]

#: the quota service (``/services/quota``): ledger, budgets, caps
QUOTA_SERVICE = "quota"
QUOTA_WRITE_SCOPE = "custom:workbench-quota:write"
QUOTA_READ_ALL_SCOPE = "custom:workbench-quota:read"
QUOTA_METRICS_SCOPE = "read:metrics"
QUOTA_ACCESS_SCOPE = f"access:services!service={QUOTA_SERVICE}"
QUOTA_CUSTOM_SCOPES = {
    QUOTA_WRITE_SCOPE: {
        "description": "Record usage events, admissions and reconciles in the quota service's ledger",
    },
    QUOTA_READ_ALL_SCOPE: {
        "description": "Read every user's and group's usage from the quota service",
    },
}

#: the sessions service (``/services/sessions``), and what its token may do
SESSIONS_SERVICE = "sessions"
SESSIONS_SCOPES = [
    "list:users",
    "read:users:name",
    "read:users:groups",  # the user's groups decide the group session limit
    "read:servers",  # servers with started, last_activity, user_options
    "admin:server_state",  # the spawner state: the profile actually started and its gpu_devices
    "delete:servers",
]
SESSIONS_ACCESS_SCOPE = f"access:services!service={SESSIONS_SERVICE}"

#: the rosters service (``/services/rosters``): course rosters loaded by instructors and admins
ROSTERS_SERVICE = "rosters"
ROSTERS_ACCESS_SCOPE = f"access:services!service={ROSTERS_SERVICE}"
#: the hub group property that keeps a course's roster
ROSTER_PROPERTY = "workbench_roster"

#: scopes of $JUPYTERHUB_API_TOKEN in single-user servers: the defaults of the `server`
#: role, plus the gateway (so `Gateway()` works) and the user's own groups (for options).
SERVER_TOKEN_SCOPES = [
    "users:activity!user",
    "access:servers!server",
    "read:users:groups!user",
    GATEWAY_ACCESS_SCOPE,
]

#: the quota ledger's database URL (PostgreSQL in production; default SQLite in the state folder)
QUOTA_DB_URL_ENV = "WORKBENCH_QUOTA_DB_URL"

#: the jobs service (``/services/jobs``): notebooks run as batch jobs (workbench.jobs)
JOBS_SERVICE = "jobs"
JOBS_ACCESS_SCOPE = f"access:services!service={JOBS_SERVICE}"
