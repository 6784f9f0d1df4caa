"""Admission and accounting of Dask clusters, for every backend: caps per user, each scheduler and worker admitted
by the quota service before it starts, stop events, reconcile and enforcement (:class:`ClusterCapMixin`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.db_base import JobStatus
from traitlets import Float as FloatTrait
from traitlets import Unicode
from traitlets.config import LoggingConfigurable

from workbench.gateway.options import SCHEDULER_CORES, SCHEDULER_MEMORY
from workbench.policy import Policy, cached_policy
from workbench.services.quota.client import QuotaClient, QuotaUnavailable


class ClusterCapMixin(LoggingConfigurable):
    """Enforce the group's ``dask.max_clusters`` per user, atomically, and account clusters with the quota service.

    The count of the user's active clusters and the creation of the new one happen with no
    ``await`` in between, so concurrent requests in the gateway's event loop cannot overshoot.

    With :attr:`quota_api_url` set (the embedded workbench sets it when the quota service runs):

    - a new cluster's scheduler is admitted before it starts (the group's CPU budget and, for a
      cluster with GPU workers, its GPU budget): a refusal fails the request with the service's
      message (what is spent, how much was used, when it resets);
    - each worker is admitted before it starts (budgets and the running-GPU caps); refused
      workers fail (a cap refusal is retried later, it does not count towards failing the cluster);
    - stops of schedulers and workers are recorded; every :attr:`quota_every` seconds the
      running schedulers and workers are reconciled with the ledger (nothing is lost if the
      gateway or the service restarts), and clusters that draw on a spent budget are stopped
      once the policy's ``budget.grace`` is over.
    """

    quota_api_url = Unicode("", help="The quota service's API (.../services/quota/api); empty: no quota.").tag(
        config=True
    )
    quota_api_token = Unicode("", help="A hub token with custom:workbench-quota:write.").tag(config=True)
    quota_every = FloatTrait(30.0, help="Seconds between reconciles with the quota ledger and budget checks.").tag(
        config=True
    )
    policy_path = Unicode("", help="The platform YAML (which group a user's clusters are charged to).").tag(config=True)

    @property
    def quota(self) -> QuotaClient | None:
        return QuotaClient(self.quota_api_url, self.quota_api_token) if self.quota_api_url else None

    @property
    def policy(self) -> Policy:
        return cached_policy(self.policy_path)

    async def start_cluster(self, user, cluster_options):
        options, config = await self.process_cluster_options(user, cluster_options)
        limit = getattr(config, "max_clusters", None)
        if limit is not None:
            active = self.db.list_clusters(username=user.name)
            if len(active) >= limit:
                raise PublicException(
                    f"You already have {len(active)} active Dask cluster(s), the most your group allows "
                    f"(dask.max_clusters = {limit}). Stop one with cluster.shutdown() or "
                    f"Gateway().stop_cluster(name), then try again."
                )
        config = config.to_dict()
        if self.quota is not None:
            config[CHARGE_KEY] = self.policy.dask_group_for(list(user.groups)) or ""
        cluster = self.db.create_cluster(user.name, options, config)
        self.log.info("Created cluster %s for user %s", cluster.name, user.name)
        if self.quota is not None:
            await self._admit_scheduler(cluster)
        self.queue.put(cluster)
        return cluster.name

    # -- quota -------------------------------------------------------------------

    def _resources(self, cluster, worker=None) -> dict:
        group = cluster.config.get(CHARGE_KEY) or ""
        if worker is None:
            return {
                "cpu": float(cluster.config.get("scheduler_cores", SCHEDULER_CORES)),
                "memory": int(cluster.config.get("scheduler_memory", SCHEDULER_MEMORY)),
            }
        gpus = int(cluster.config.get("worker_gpus", 0) or 0)
        dask = self.policy.groups[group].dask if group in self.policy.groups else None
        return {
            "cpu": float(cluster.config.get("worker_cores", 1)),
            "memory": int(cluster.config.get("worker_memory", 0)),
            "gpu_count": gpus,
            "gpu_type": dask.gpu_type if gpus and dask is not None else None,
        }

    async def _admit_scheduler(self, cluster) -> None:
        group = cluster.config.get(CHARGE_KEY) or ""
        try:
            decision = await self.quota.admit(
                item=scheduler_item(cluster.name),
                kind="dask-scheduler",
                user=cluster.username,
                group=group,
                needs_gpu_budget=bool(cluster.config.get("worker_gpus")) or None,
                **self._resources(cluster),
            )
        except QuotaUnavailable as e:
            self.log.error("Refusing cluster %s of %s: %s", cluster.name, cluster.username, e)
            decision = None
        if decision is None or not decision.allowed:
            self.db.update_cluster(cluster, target=JobStatus.FAILED)
            self.queue.put(cluster)  # CREATED -> FAILED, nothing started
            raise PublicException(
                decision.message
                if decision is not None
                else "The quota service does not answer, so no Dask cluster can start now; try again in a minute."
            )

    async def do_start_worker(self, worker):
        if self.quota is not None:
            cluster = worker.cluster
            try:
                decision = await self.quota.admit(
                    item=worker_item(cluster.name, worker.name),
                    kind="dask-worker",
                    user=cluster.username,
                    group=cluster.config.get(CHARGE_KEY) or "",
                    **self._resources(cluster, worker),
                )
            except QuotaUnavailable as e:
                raise RuntimeError(f"worker {worker.name} not started: {e}") from None
            if not decision.allowed:
                self.log.warning(
                    "Quota refused worker %s of cluster %s (%s): %s",
                    worker.name,
                    cluster.name,
                    decision.reason,
                    decision.message,
                )
                if decision.reason and decision.reason.startswith("running-"):
                    cluster.worker_start_failure_count -= 1  # a cap frees up: not a failure of this cluster
                raise RuntimeError(decision.message)
        async for state in super().do_start_worker(worker):
            yield state

    async def do_stop_worker(self, worker):
        try:
            await super().do_stop_worker(worker)
        finally:
            if self.quota is not None:
                await self._send_stops([worker_item(worker.cluster.name, worker.name)])

    async def do_stop_cluster(self, cluster):
        try:
            await super().do_stop_cluster(cluster)
        finally:
            if self.quota is not None:  # its workers too: a bulk shutdown does not stop them one by one
                items = [scheduler_item(cluster.name)] + [worker_item(cluster.name, w) for w in cluster.workers]
                await self._send_stops(items)

    async def _send_stops(self, items: list[str]) -> None:
        """Send stop events in a task of their own that a shutdown waits for (:meth:`do_cleanup`): a stop in flight
        when the gateway is told to exit still reaches the ledger instead of dying with the event loop."""
        pending = self.__dict__.setdefault("_quota_stops", set())
        task = asyncio.ensure_future(self.quota.stop_many(items, tries=2, delay=0.5))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.shield(task)

    async def flush_quota_stops(self, timeout: float = 15.0) -> int:
        """Wait (at most ``timeout`` s) for the stop events still in flight; returns how many there were."""
        pending = [t for t in self.__dict__.get("_quota_stops", ()) if not t.done()]
        if pending:
            self.log.info("Sending %d stop event(s) to the quota service before exiting", len(pending))
            await asyncio.wait(pending, timeout=timeout)
        return len(pending)

    async def do_setup(self):
        await super().do_setup()
        if self.quota is not None:
            self.task_pool.spawn(self._quota_loop())

    async def do_cleanup(self):
        # dask-gateway's cleanup has stopped the clusters and drained its reconcilers: their stop events go now,
        # while the quota service still runs (the hub stops its services in order, the quota service last)
        await self.flush_quota_stops()
        await super().do_cleanup()

    def running_items(self) -> list[dict]:
        """Schedulers and (submitted or running) workers of the active clusters, as the ledger's running items."""
        items = []
        for cluster in self.db.active_clusters():
            group = cluster.config.get(CHARGE_KEY)
            if not group:
                continue
            base = {"user": cluster.username, "group": group}
            items.append(
                {
                    "item": scheduler_item(cluster.name),
                    "kind": "dask-scheduler",
                    **base,
                    **self._resources(cluster),
                    "started": _iso(cluster.start_time),
                }
            )
            for w in cluster.workers.values():
                if JobStatus.SUBMITTED <= w.status < JobStatus.STOPPED:
                    res = {k: v for k, v in self._resources(cluster, w).items() if v is not None}
                    items.append(
                        {
                            "item": worker_item(cluster.name, w.name),
                            "kind": "dask-worker",
                            **base,
                            **res,
                            "started": _iso(w.start_time),
                        }
                    )
        return items

    async def quota_round(self) -> list[str]:
        """Reconcile running schedulers and workers with the ledger, then stop clusters past a spent budget's grace."""
        await self.quota.reconcile(["dask-scheduler", "dask-worker"], self.running_items())
        stopped = []
        for entry in await self.quota.enforcement(["dask-scheduler", "dask-worker"]):
            if not entry["due"]:
                continue
            name = entry["item"].split(":", 1)[1].split("/", 1)[0]
            cluster = self.db.get_cluster(name)
            if cluster is None or cluster.target > JobStatus.RUNNING or name in stopped:
                continue
            self.log.warning("Stopping cluster %s of %s: %s", name, cluster.username, entry["message"])
            await self.stop_cluster(name, failed=True)
            stopped.append(name)
        return stopped

    async def _quota_loop(self):
        while True:
            try:
                await self.quota_round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the service may be restarting; the next round retries
                self.log.warning("Quota round failed (retrying in %gs): %s", self.quota_every, e)
            await asyncio.sleep(self.quota_every)


CHARGE_KEY = "workbench_charge_group"


def scheduler_item(cluster: str) -> str:
    return f"dask-scheduler:{cluster}"


def worker_item(cluster: str, worker: str) -> str:
    return f"dask-worker:{cluster}/{worker}"


def _iso(ms: int | None) -> str | None:
    """dask-gateway's timestamps (ms since the epoch, UTC) as ISO 8601."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat() if ms else None
