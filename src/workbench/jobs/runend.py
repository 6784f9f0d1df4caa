"""The ends of notebook jobs' runs for the jobs service: their Dask Gateway access (issue 15), from submission to
the run's end, and the run's start/stop in the quota ledger and budget enforcement (:func:`charge`,
:func:`enforce`).

:class:`GatewayAccess` does, with the jobs service's own hub token:

- at submission (:meth:`GatewayAccess.grant`): asks the hub for a token of the job's user holding only the
  gateway access scope (:func:`workbench.jobs.gateway.token_request`: ``POST /users/<user>/tokens``,
  expiring at the time limit + 600 s), writes it *as the user* into ``<run folder>/.gateway-token`` (0600;
  ``execute`` moves it into the job's ``JUPYTERHUB_API_TOKEN``) and returns the job's non-secret gateway
  environment (the server's Dask settings and the cluster tag). The token is never on a command line nor in
  Slurm's job record; the jobs table keeps only the token's *id* (``gateway_token``);
- at any end of the run (completed, failed, cancelled, timeout, budget; also after a restart of the service,
  since the id is in the table) (:meth:`GatewayAccess.end`): stops the clusters tagged with the job's id with a
  fresh five-minute gateway token of the user (the run's own token is not kept), then deletes both tokens.

The hub grants the service this through the role of :func:`workbench.jobs.wiring.jobs_roles_for`
(``tokens!group=<policy group>``). The hub itself refuses a token with scopes its user does not hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from tornado import httpclient

from workbench.jobs.gateway import TOKEN_FILE, job_dask_env, stop_run_clusters, token_request
from workbench.jobs.model import job_item_id
from workbench.jobs.store import FINAL_STATES
from workbench.names import GATEWAY_ACCESS_SCOPE
from workbench.services.quota.client import QuotaUnavailable

log = logging.getLogger("workbench.jobs")

#: seconds the service's own clean-up token of a user lives
CLEANUP_TOKEN_S = 300


class GatewayAccess:
    """Tokens and clusters of the runs' gateway access (see the module docstring).

    ``hub``: a :class:`workbench.services.base.HubClient` of the jobs service; ``address``: the gateway's
    address as notebook servers get it; ``dask_env(user_groups)``: the server's Dask settings
    (:func:`workbench.spawn.common.dask_environment`).
    """

    def __init__(self, hub, address: str, dask_env: Callable[[list[str]], Mapping[str, str]]):
        self.hub = hub
        self.address = address
        self.dask_env = dask_env

    async def _hub(self, method: str, path: str, body: dict | None = None) -> dict | None:
        r = await self.hub.http.fetch(
            f"{self.hub.api_url}{path}",
            method=method,
            headers={"Authorization": f"token {self.hub.token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None,
            request_timeout=30,
            allow_nonstandard_methods=True,
        )
        return json.loads(r.body) if r.body else None

    async def new_token(self, user: str, body: dict) -> tuple[str, str]:
        """``(token, token id)`` of a new token of ``user`` (the hub's 400 names a scope the user lacks)."""
        model = await self._hub("POST", f"/users/{quote(user)}/tokens", body)
        return model["token"], model["id"]

    async def delete_token(self, user: str, token_id: str) -> None:
        """Delete a token of ``user``; one already gone (expired, the user deleted) counts as deleted."""
        try:
            await self._hub("DELETE", f"/users/{quote(user)}/tokens/{quote(token_id)}")
        except httpclient.HTTPClientError as e:
            if e.code != 404:
                raise

    async def grant(self, job: dict, groups: list[str]) -> tuple[dict[str, str], str]:
        """Mint the run's token and record its id in ``job`` (``gateway_token``); returns the job's gateway
        environment (no secret in it) and the token, which the caller hands to the job (:func:`write_token_file`,
        or the Kubernetes engine's per-run Secret) and then forgets."""
        token, token_id = await self.new_token(job["user"], token_request(job["id"], job["time_limit"]))
        job["gateway_token"] = token_id
        return job_dask_env(self.dask_env(groups), job["id"]), token

    async def end(self, job: dict) -> list[str]:
        """Stop the run's clusters and delete its token; returns the clusters stopped. Raises when the hub
        or the gateway does not answer (the next round retries: the token id stays in the table)."""
        token, token_id = await self.new_token(
            job["user"],
            {"scopes": [GATEWAY_ACCESS_SCOPE], "expires_in": CLEANUP_TOKEN_S, "note": f"end of job {job['id']}"},
        )
        try:
            stopped = await asyncio.to_thread(stop_run_clusters, self.address, token, job["id"])
        finally:
            await self.delete_token(job["user"], token_id)
        if job.get("gateway_token"):
            await self.delete_token(job["user"], job["gateway_token"])
        if stopped:
            log.info("job %s of %s ended: stopped its Dask cluster(s) %s", job["id"], job["user"], ", ".join(stopped))
        return stopped


def server_dask_env(policy, rt) -> Callable[[list[str]], dict[str, str]]:
    """``user groups -> the Dask settings a notebook server of the embedded workbench gets`` (pure): the
    gateway's public address and proxy address of the runtime (:class:`workbench.runtime.Runtime`)."""
    from workbench.spawn.common import dask_environment

    return lambda groups: dask_environment(policy, groups, rt.gateway_public_url, rt.gateway_proxy_address)


def gateway_access(hub, policy, rt, engine: str, env) -> GatewayAccess | None:
    """The runs' gateway access of the jobs service: on the embedded engines (local, Slurm) the address notebook
    servers get from the runtime; on Kubernetes the one the chart gives the jobs pod
    (:func:`workbench.jobs.kube.kube_gateway`); None where there is no gateway."""
    if engine == "kubernetes":
        from workbench.jobs.kube import kube_gateway

        found = kube_gateway(policy, env)
        return GatewayAccess(hub, *found) if found else None
    if rt is None:
        return None
    return GatewayAccess(hub, rt.gateway_public_url, server_dask_env(policy, rt))


def token_file_command(run_dir: str) -> list[str]:
    """The command, run as the user, that creates the run folder and writes stdin to its token file with
    mode 0600 (pure)."""
    path = f"{run_dir.rstrip('/')}/{TOKEN_FILE}"
    script = (
        f"umask 077 && mkdir -p -- {shlex.quote(run_dir)} && rm -f -- {shlex.quote(path)} && cat > {shlex.quote(path)}"
    )
    return ["sh", "-c", script]


def write_token_file(account, job: dict, token: str) -> dict:
    """Write the run's token into its run folder *as the user* (root opens nothing the user controls); returns
    ``{}`` (nothing more for the engine)."""
    from workbench.jobs.engines import run_as

    res = run_as(account, token_file_command(job["run_dir"]), stdin=token, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"cannot write the job's gateway token as {account.name}: {res.stderr.decode().strip()}")
    return {}


# -- the run's end in the quota ledger and the budget's end of runs (moved from the service) ------------------


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") if t else None


async def charge(store, quota) -> None:
    """Start and stop events of the runs (event ids are fixed, so a retry is a no-op)."""
    if quota is None:
        return
    events, marks = [], []
    for job in store.unsettled():
        item = job_item_id(job["user"], job["id"])
        if not job["charged_start"]:
            events.append(
                {
                    "id": f"start:{item}",
                    "type": "start",
                    "item": item,
                    "kind": "job",
                    "user": job["user"],
                    "group": job["grp"],
                    "profile": job["profile"],
                    "time": _iso(job["started"]),
                }
            )
            marks.append((job["id"], "charged_start"))
        if job["ended"]:
            events.append({"id": f"stop:{item}", "type": "stop", "item": item, "time": _iso(job["ended"])})
            marks.append((job["id"], "charged_stop"))
    if not events:
        return
    try:
        await quota.events(events)
    except QuotaUnavailable as e:
        log.warning("could not record job usage (next round retries): %s", e)
        return
    for jid, col in marks:
        store.update(jid, **{col: 1})


async def enforce(store, quota, engine) -> None:
    """Cancel running jobs whose budget is spent (the quota service's plan, past its grace)."""
    if quota is None:
        return
    for plan in await quota.enforcement(["job"]):
        if not plan.get("due"):
            continue
        jid = plan["item"].rsplit("/", 1)[-1]
        job = store.get(jid)
        if job and job["state"] not in FINAL_STATES:
            log.info("cancelling job %s of %s: %s", jid, job["user"], plan.get("message"))
            store.update(jid, reason=f"budget: {plan.get('message', '')}")
            await engine.cancel(job)


async def end_gateway_access(store, gateway: GatewayAccess) -> None:
    """For every ended run that still holds a gateway token: stop its clusters and delete the token
    (a failure is logged and retried next round; the token also expires on its own)."""
    for job in store.gateway_pending():
        try:
            await gateway.end(job)
        except Exception as e:  # the hub or gateway not answering: the next round retries
            log.warning("ending the gateway access of job %s of %s (next round retries): %s", job["id"], job["user"], e)
            continue
        store.update(job["id"], gateway_token=None)


__all__ = [
    "CLEANUP_TOKEN_S",
    "GatewayAccess",
    "gateway_access",
    "server_dask_env",
    "charge",
    "end_gateway_access",
    "enforce",
    "token_file_command",
    "write_token_file",
]
