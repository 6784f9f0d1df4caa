"""Dask Gateway access of a notebook job (issue 15): the token request, the job's gateway environment, and
stopping the clusters a run created.

Pure builders (:func:`token_request`, :func:`token_expires_in`, :func:`job_gateway_env`) and the small
synchronous gateway client the job itself uses (:func:`list_clusters`, :func:`stop_new_clusters`), run by
:mod:`workbench.jobs.execute` as the user, with the user's own gateway-scoped token. Not yet wired into the
jobs service's submission (see the README's notebook-jobs section).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Mapping

from workbench.names import GATEWAY_ACCESS_SCOPE

#: seconds a job's gateway token outlives the job's time limit (start-up, the final cluster stop)
TOKEN_MARGIN_S = 600
#: a job without a time limit gets a token valid this long
DEFAULT_TOKEN_LIFETIME_S = 24 * 3600


def token_expires_in(time_limit_s: float | None, margin_s: int = TOKEN_MARGIN_S) -> int:
    """Seconds the run's token lives: the job's time limit plus ``margin_s`` (pure)."""
    if not time_limit_s or time_limit_s <= 0:
        return DEFAULT_TOKEN_LIFETIME_S + margin_s
    return int(time_limit_s) + margin_s


def token_request(job_id: str, time_limit_s: float | None) -> dict:
    """Body of ``POST /hub/api/users/<user>/tokens`` for a run (pure): only the gateway access scope,
    asked for explicitly so the token never carries the user's other rights."""
    return {
        "scopes": [GATEWAY_ACCESS_SCOPE],
        "expires_in": token_expires_in(time_limit_s),
        "note": f"workbench job {job_id}: Dask Gateway access for this run",
    }


def job_gateway_env(dask_env: Mapping[str, str], token: str) -> dict[str, str]:
    """The run's environment for ``dask_gateway.Gateway()`` (pure): the server's gateway settings
    (:func:`workbench.spawn.common.dask_environment`) plus the token as ``JUPYTERHUB_API_TOKEN``."""
    if not token:
        raise ValueError("job_gateway_env: a run needs its gateway token (token_request) to use the gateway")
    return {**dask_env, "JUPYTERHUB_API_TOKEN": token}


def api_url(gateway_address: str) -> str:
    """The gateway's REST API under its address (``.../services/dask-gateway`` → ``.../api/v1``) (pure)."""
    return gateway_address.rstrip("/") + "/api/v1"


def _call(url: str, token: str, method: str = "GET", timeout: float = 20):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"jupyterhub {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the gateway's own address
        body = resp.read()
    return json.loads(body) if body else None


def list_clusters(gateway_address: str, token: str) -> set[str]:
    """Names of the user's running clusters (the gateway lists only the token's user's)."""
    return set(_call(api_url(gateway_address) + "/clusters/", token) or {})


def stop_new_clusters(gateway_address: str, token: str, before: Iterable[str]) -> list[str]:
    """Stop the user's clusters not in ``before`` (those the run created); returns their names.
    A gateway that does not answer is reported by the caller, never raises past it."""
    before = set(before)
    stopped = []
    for name in sorted(list_clusters(gateway_address, token) - before):
        _call(f"{api_url(gateway_address)}/clusters/{name}", token, method="DELETE")
        stopped.append(name)
    return stopped


__all__ = [
    "TOKEN_MARGIN_S",
    "api_url",
    "job_gateway_env",
    "list_clusters",
    "stop_new_clusters",
    "token_expires_in",
    "token_request",
]
