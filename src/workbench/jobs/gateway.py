"""Dask Gateway access of a notebook job (issue 15): the token request, the job's gateway environment, and
stopping the clusters a run created.

Pure builders (:func:`token_request`, :func:`token_expires_in`, :func:`job_gateway_env`, :func:`job_dask_env`)
and the small synchronous gateway client (:func:`list_clusters`, :func:`run_clusters`, :func:`stop_run_clusters`)
used by :mod:`workbench.jobs.execute` (as the user, with the run's gateway-scoped token) and by the jobs
service at the run's end (:mod:`workbench.jobs.runend`, with a short-lived token of the same scope).

The key of a run's clusters: every cluster the job creates carries the cluster option ``workbench_job`` =
``job-<the job's id>`` (:data:`JOB_TAG_OPTION`, set through ``DASK_GATEWAY__CLUSTER__OPTIONS__WORKBENCH_JOB`` in the
job's environment; the gateway records a cluster's options and lists them). Its limit: the notebook may
override the option (``Gateway().new_cluster(workbench_job="")``) and the cluster then outlives the run like
any of the user's own clusters; a user can only tag their own clusters, so a tag never reaches another user.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping

from workbench.names import GATEWAY_ACCESS_SCOPE

#: the cluster option that tags a cluster with the notebook job that created it (workbench.gateway.options)
JOB_TAG_OPTION = "workbench_job"
#: the environment variable that sets it in the job (dask's config: ``gateway.cluster.options.workbench_job``)
JOB_TAG_ENV = "DASK_GATEWAY__CLUSTER__OPTIONS__WORKBENCH_JOB"
#: the file in the run folder that carries the run's token to the job (0600, written as the user, read and
#: removed by execute): never on a command line or in Slurm's job environment
TOKEN_FILE = ".gateway-token"
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


def job_dask_env(dask_env: Mapping[str, str], job_id: str) -> dict[str, str]:
    """The run's non-secret gateway settings (pure): the server's (:func:`workbench.spawn.common.dask_environment`)
    plus the tag that marks the clusters it creates as this job's."""
    return {**dask_env, JOB_TAG_ENV: job_tag(job_id)}


def job_tag(job_id: str) -> str:
    """The tag value of a job's clusters (pure): ``job-<id>``, never all digits, which dask's config would read
    from the environment as a number (``ast.literal_eval``) that the gateway's string option refuses."""
    return f"job-{job_id}"


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


def cluster_models(gateway_address: str, token: str) -> dict[str, dict]:
    """The user's running clusters, name -> the gateway's model (with ``options``)."""
    return dict(_call(api_url(gateway_address) + "/clusters/", token) or {})


def run_clusters(models: dict[str, dict], job_id: str) -> list[str]:
    """Names of the clusters tagged with ``job_id`` (:func:`job_tag`) (pure)."""
    tag = job_tag(job_id)
    return sorted(n for n, m in models.items() if ((m or {}).get("options") or {}).get(JOB_TAG_OPTION) == tag)


def stop_run_clusters(gateway_address: str, token: str, job_id: str) -> list[str]:
    """Stop the user's clusters tagged with ``job_id``; returns their names (raises OSError/ValueError when
    the gateway does not answer: the caller reports it)."""
    if not job_id:
        return []
    stopped = []
    for name in run_clusters(cluster_models(gateway_address, token), job_id):
        _call(f"{api_url(gateway_address)}/clusters/{name}", token, method="DELETE")
        stopped.append(name)
    return stopped


__all__ = [
    "JOB_TAG_ENV",
    "JOB_TAG_OPTION",
    "TOKEN_FILE",
    "TOKEN_MARGIN_S",
    "api_url",
    "cluster_models",
    "job_dask_env",
    "job_gateway_env",
    "job_tag",
    "list_clusters",
    "run_clusters",
    "stop_run_clusters",
    "token_expires_in",
    "token_request",
]
