"""How the embedded hub runs the jobs service: a managed service, its roles and scopes (pure).

``add_jobs_service(settings, policy, runtime, secrets)`` adds to the settings of
:func:`workbench.embedded.hub.hub_settings`:

- the managed service ``jobs`` at ``/services/jobs`` (``python -m workbench.jobs``), its own token
  (``jobs_api_token`` in the state folder's secrets), on ``runtime.extra["jobs_port"]`` or a free port;
- roles: every policy group may call it (each sees their own jobs; instructors their course's);
  the service may read users' groups and course groups, (with the quota service) write the ledger, and
  create and delete the tokens of group members (:func:`token_scopes`: a job's gateway token);
- ``access:services!service=jobs`` in single-user servers' tokens, so ``workbench job`` works in a terminal.

:func:`jobs_roles_for` gives the same roles to the Kubernetes hub (:mod:`workbench.kubernetes.hub`), where the
service runs in its own pod (the chart's ``jobs.enabled``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from workbench.names import JOBS_ACCESS_SCOPE, JOBS_SERVICE, QUOTA_WRITE_SCOPE
from workbench.policy import Policy
from workbench.runtime import RUNTIME_ENV, Runtime, free_port

#: what the jobs service's own token may do
SERVICE_SCOPES = ["read:users:name", "read:users:groups", "read:groups", "list:groups"]


def token_scopes(policy: Policy) -> list[str]:
    """``tokens`` filtered to the policy's groups' members (pure). Why: a notebook job may use Dask Gateway with
    its user's rights (issue 15), so the service mints, per run, a token of the job's user holding only the
    gateway access scope (:mod:`workbench.jobs.runend`) and deletes it when the run ends. Filtered to group
    members, it covers every user who can submit a job and no service's or other account's tokens; the hub
    grants a token no scope its user lacks, whatever the service asks for."""
    return [f"tokens!group={g}" for g in policy.groups]


def jobs_service(runtime: Runtime, secrets: Mapping[str, str]) -> dict:
    port = int((runtime.extra or {}).get("jobs_port") or 0) or free_port()
    return {
        "name": JOBS_SERVICE,
        "url": f"http://127.0.0.1:{port}",
        "api_token": secrets["jobs_api_token"],
        "command": [str(Path(runtime.venv_bin, "python")), "-m", "workbench.jobs"],
        "cwd": runtime.state_dir,
        "environment": {RUNTIME_ENV: str(Path(runtime.state_dir, "runtime.json"))},
    }


def jobs_roles(policy: Policy, runtime: Runtime) -> list[dict]:
    return jobs_roles_for(policy, bool(runtime.quota_port))


def jobs_roles_for(policy: Policy, quota: bool) -> list[dict]:
    """The jobs service's roles (pure): every policy group may call it; the service reads users' groups and
    (``quota``: with a quota service) writes the ledger. Used by the embedded hub and on Kubernetes."""
    return [
        {
            "name": "workbench-jobs-users",
            "description": "May submit, list and cancel their notebook jobs (workbench.jobs)",
            "scopes": [JOBS_ACCESS_SCOPE],
            "groups": list(policy.groups),
        },
        {
            "name": "workbench-jobs-service",
            "description": "The jobs service: users' groups, course members, usage of jobs in the quota ledger",
            "scopes": SERVICE_SCOPES + token_scopes(policy) + ([QUOTA_WRITE_SCOPE] if quota else []),
            "services": [JOBS_SERVICE],
        },
    ]


def add_jobs_service(settings: dict, policy: Policy, runtime: Runtime, secrets: Mapping[str, str]) -> dict:
    """Add the jobs service to hub ``settings`` (when the secrets hold its token, as every state folder's
    do since ``jobs_api_token`` joined :data:`workbench.runtime.SECRET_NAMES`); returns ``settings``."""
    if not secrets.get("jobs_api_token"):
        return settings
    hub = settings["JupyterHub"]
    hub["services"] = [*hub.get("services", []), jobs_service(runtime, secrets)]
    hub["load_roles"] = [*hub.get("load_roles", []), *jobs_roles(policy, runtime)]
    spawner = settings.setdefault("Spawner", {})
    scopes = list(spawner.get("server_token_scopes", []))
    if JOBS_ACCESS_SCOPE not in scopes:
        scopes.append(JOBS_ACCESS_SCOPE)
    spawner["server_token_scopes"] = scopes
    return settings
