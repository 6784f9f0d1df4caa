"""How the embedded hub runs the quota service: a managed service, its roles and custom scopes (pure).

``add_quota_service(settings, ...)`` adds to the hub settings of :func:`workbench.embedded.hub.hub_settings`,
when ``runtime.quota_port`` is set (``workbench up`` sets it):

- the managed service ``quota`` at ``/services/quota`` (``python -m workbench.services.quota``), with
  its own token (``quota_api_token`` in the state folder's secrets);
- the custom scopes ``custom:workbench-quota:write`` and ``custom:workbench-quota:read``;
- roles: every policy group may access the service (each user then sees what
  :mod:`workbench.services.quota.authz` allows); the service may list users, their groups and servers
  (to reconcile servers) and write to its ledger; the gateway's token may write events;
- ``access:services!service=quota`` in single-user servers' tokens, so notebooks can ask.

``pass_db_url(settings, environ)`` hands ``$WORKBENCH_QUOTA_DB_URL`` of the hub's environment
to the service (the URL may hold a password, so it is never written to runtime.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from workbench.names import GATEWAY_SERVICE
from workbench.names import QUOTA_DB_URL_ENV as DB_URL_ENV
from workbench.policy import Policy
from workbench.runtime import RUNTIME_ENV, Runtime
from workbench.services.quota.authz import ACCESS_SCOPE, CUSTOM_SCOPES, SERVICE_NAME, WRITE_SCOPE

#: what the quota service's own token may do
SERVICE_SCOPES = ["list:users", "read:users:name", "read:users:groups", "read:servers", "delete:servers", WRITE_SCOPE]


def quota_service(runtime: Runtime, secrets: Mapping[str, str]) -> dict:
    return {
        "name": SERVICE_NAME,
        "url": f"http://127.0.0.1:{runtime.quota_port}",
        "api_token": secrets["quota_api_token"],
        "command": [
            str(Path(runtime.venv_bin, "python")),
            "-m",
            "workbench.services.quota",
            f"--enforce-every={runtime.quota_every:g}",
        ],
        "cwd": runtime.state_dir,
        "environment": {RUNTIME_ENV: str(Path(runtime.state_dir, "runtime.json"))},
    }


def quota_roles(policy: Policy) -> list[dict]:
    return [
        {
            "name": "workbench-quota-users",
            "description": "May ask the quota service for usage (what each may see is decided by the service)",
            "scopes": [ACCESS_SCOPE],
            "groups": list(policy.groups),
        },
        {
            "name": "workbench-quota-service",
            "description": "The quota service: reconcile servers with the hub, write its ledger, stop servers of spent budgets",
            "scopes": list(SERVICE_SCOPES),
            "services": [SERVICE_NAME],
        },
        {
            "name": "workbench-quota-writers",
            "description": "Send usage events (starts and stops of Dask schedulers and workers) to the quota service",
            "scopes": [WRITE_SCOPE],
            "services": [GATEWAY_SERVICE],
        },
    ]


def add_quota_service(settings: dict, policy: Policy, runtime: Runtime, secrets: Mapping[str, str]) -> dict:
    """Add the quota service to hub ``settings`` when ``runtime.quota_port`` is set; returns ``settings``."""
    if not runtime.quota_port:
        return settings
    hub = settings["JupyterHub"]
    hub["services"] = [*hub.get("services", []), quota_service(runtime, secrets)]
    hub["load_roles"] = [*hub.get("load_roles", []), *quota_roles(policy)]
    hub["custom_scopes"] = {**hub.get("custom_scopes", {}), **CUSTOM_SCOPES}
    spawner = settings.setdefault("Spawner", {})
    scopes = list(spawner.get("server_token_scopes", []))
    if ACCESS_SCOPE not in scopes:
        scopes.append(ACCESS_SCOPE)
    spawner["server_token_scopes"] = scopes
    if "WorkbenchLocalSpawner" in settings:  # every start is admitted by the service, every stop recorded
        settings["WorkbenchLocalSpawner"]["quota_api_url"] = (
            f"http://127.0.0.1:{runtime.quota_port}/services/{SERVICE_NAME}/api"
        )
        settings["WorkbenchLocalSpawner"]["quota_api_token"] = secrets["quota_api_token"]
    return settings


def pass_db_url(settings: dict, environ: Mapping[str, str]) -> None:
    """Give the quota service ``$WORKBENCH_QUOTA_DB_URL`` from ``environ`` (the hub's), if set."""
    url = environ.get(DB_URL_ENV)
    if not url:
        return
    for svc in settings.get("JupyterHub", {}).get("services", []):
        if svc.get("name") == SERVICE_NAME:
            svc["environment"] = {**svc.get("environment", {}), DB_URL_ENV: url}
