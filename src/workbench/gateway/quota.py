"""Admission and accounting of Dask clusters, for every backend: caps per user, each scheduler and worker admitted
by the quota service before it starts, stop events, reconcile and enforcement.

- :class:`ClusterQuota` — what every backend shares: the ``dask.max_clusters`` refusal, the resources a
  scheduler or worker holds, the admission of a scheduler, the reconcile-and-enforce round;
- :class:`ClusterCapMixin` — on it, the hooks of dask-gateway's database backends (local, Slurm);
- :class:`workbench.gateway.kube.WorkbenchKubeBackend` — on it, the hooks of the Kubernetes backend.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.db_base import JobStatus
from traitlets import Float as FloatTrait
from traitlets import Unicode
from traitlets.config import LoggingConfigurable

from workbench.gateway.options import SCHEDULER_CORES, SCHEDULER_MEMORY
from workbench.policy import Policy, cached_policy
from workbench.services.quota.client import QuotaClient, QuotaUnavailable


class ClusterQuota(LoggingConfigurable):
    """Caps and quota of Dask clusters, written once for every gateway backend.

    A backend supplies :meth:`running_items` (its schedulers and workers as the ledger's running items)
    and :meth:`_cluster_active`, and calls :meth:`check_cluster_cap` and :meth:`scheduler_refusal` before
    it creates anything; :meth:`quota_round` (every :attr:`quota_every` seconds, :meth:`_quota_loop`)
    reconciles with the ledger and stops clusters that draw on a spent budget once its grace is over.
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

    def check_cluster_cap(self, limit: int | None, active: int) -> None:
        """Refuse a new cluster (PublicException) when the user already has ``limit`` active ones; None: no cap."""
        if limit is not None and active >= limit:
            raise PublicException(
                f"You already have {active} active Dask cluster(s), the most your group allows "
                f"(dask.max_clusters = {limit}). Stop one with cluster.shutdown() or "
                f"Gateway().stop_cluster(name), then try again."
            )

    def charge_group(self, user) -> str:
        """The group a user's new cluster is charged to: their most generous Dask group."""
        return self.policy.dask_group_for(list(user.groups)) or ""

    async def scheduler_refusal(self, name: str, username: str, config) -> str | None:
        """Admit the scheduler of a new cluster (its config carries :data:`CHARGE_KEY`): None when admitted, else
        the message the user gets (the service's refusal, or that the service does not answer)."""
        try:
            decision = await self.quota.admit(
                item=scheduler_item(name),
                kind="dask-scheduler",
                user=username,
                group=config.get(CHARGE_KEY) or "",
                needs_gpu_budget=bool(config.get("worker_gpus")) or None,
                **self._resources(SimpleNamespace(config=config)),
            )
        except QuotaUnavailable as e:
            self.log.error("Refusing cluster %s of %s: %s", name, username, e)
            return "The quota service does not answer, so no Dask cluster can start now; try again in a minute."
        return None if decision.allowed else decision.message

    async def admit_worker(self, cluster, worker: str):
        """Ask the quota service to admit worker ``worker`` of ``cluster`` (budgets, running-GPU caps): its
        :class:`workbench.services.quota.client.Admission`; raises ``QuotaUnavailable`` when it does not answer."""
        return await self.quota.admit(
            item=worker_item(cluster.name, worker),
            kind="dask-worker",
            user=cluster.username,
            group=cluster.config.get(CHARGE_KEY) or "",
            **self._resources(cluster, worker),
        )

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

    def running_items(self) -> list[dict]:
        raise NotImplementedError

    def _cluster_active(self, name: str) -> bool:
        raise NotImplementedError

    async def quota_round(self) -> list[str]:
        """Reconcile running schedulers and workers with the ledger, then stop clusters past a spent budget's grace."""
        await self.quota.reconcile(["dask-scheduler", "dask-worker"], self.running_items())
        stopped = []
        for entry in await self.quota.enforcement(["dask-scheduler", "dask-worker"]):
            if not entry["due"]:
                continue
            name = entry["item"].split(":", 1)[1].split("/", 1)[0]
            if name in stopped or not self._cluster_active(name):
                continue
            self.log.warning("Stopping cluster %s: %s", name, entry["message"])
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


class ClusterCapMixin(ClusterQuota):
    """Enforce the group's ``dask.max_clusters`` per user, atomically, and account clusters with the quota service
    (dask-gateway's database backends: local and Slurm).

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

    async def start_cluster(self, user, cluster_options):
        options, config = await self.process_cluster_options(user, cluster_options)
        self.check_cluster_cap(getattr(config, "max_clusters", None), len(self.db.list_clusters(username=user.name)))
        config = config.to_dict()
        if self.quota is not None:
            config[CHARGE_KEY] = self.charge_group(user)
        cluster = self.db.create_cluster(user.name, options, config)
        self.log.info("Created cluster %s for user %s", cluster.name, user.name)
        if self.quota is not None:
            await self._admit_scheduler(cluster)
            self._confirm(scheduler_item(cluster.name))
        self.queue.put(cluster)
        return cluster.name

    # -- liveness since this process started (issue 16) ---------------------------
    # After a restart the gateway's database still calls running what ran before it stopped, some of which died
    # meanwhile. Until a scheduler heartbeat shows an item alive (or this process started it), the item is sent to
    # reconcile as unconfirmed: its ledger row stays open but is not marked seen; if it is then found dead, no stop
    # event at that time is sent: it is left out of the next reconcile, which closes its row at its last seen.

    def _confirmed_items(self) -> set[str]:
        return self.__dict__.setdefault("_quota_confirmed", set())

    def _dead_items(self) -> set[str]:
        return self.__dict__.setdefault("_quota_found_dead", set())

    def _confirm(self, item: str) -> None:
        self._confirmed_items().add(item)

    async def on_cluster_heartbeat(self, cluster_name, msg):
        if self.quota is not None:
            cluster = self.db.get_cluster(cluster_name)
            if cluster is not None and cluster.target <= JobStatus.RUNNING:
                self._confirm(scheduler_item(cluster_name))
                for name in set(msg.get("active_workers", ())) | set(msg.get("closing_workers", ())):
                    self._confirm(worker_item(cluster_name, name))
        return await super().on_cluster_heartbeat(cluster_name, msg)

    async def _record_stops(self, items: list[str]) -> None:
        """Stop events for the items seen alive since this process started; the others were found dead after a
        restart: the next reconcile, run now, closes their rows at the last time they were known alive."""
        confirmed = self._confirmed_items()
        live = [i for i in items if i in confirmed]
        dead = [i for i in items if i not in confirmed]
        confirmed.difference_update(items)
        if live:
            await self._send_stops(live)
        if dead:
            self.log.info("Found dead after the restart: %s (closed at their last seen by the next reconcile)", dead)
            self._dead_items().update(dead)
            try:
                await self.quota.reconcile(["dask-scheduler", "dask-worker"], self.running_items())
            except Exception as e:  # noqa: BLE001 - the periodic round retries
                self.log.warning("Reconcile after finding %s dead failed (the next round retries): %s", dead, e)

    # -- quota -------------------------------------------------------------------

    async def _admit_scheduler(self, cluster) -> None:
        refusal = await self.scheduler_refusal(cluster.name, cluster.username, cluster.config)
        if refusal is not None:
            self.db.update_cluster(cluster, target=JobStatus.FAILED)
            self.queue.put(cluster)  # CREATED -> FAILED, nothing started
            raise PublicException(refusal)

    async def do_start_worker(self, worker):
        if self.quota is not None:
            cluster = worker.cluster
            self._confirm(worker_item(cluster.name, worker.name))  # this process starts it (or refuses to)
            try:
                decision = await self.admit_worker(cluster, worker.name)
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
                await self._record_stops([worker_item(worker.cluster.name, worker.name)])

    async def do_stop_cluster(self, cluster):
        try:
            await super().do_stop_cluster(cluster)
        finally:
            if self.quota is not None:  # its workers too: a bulk shutdown does not stop them one by one
                items = [scheduler_item(cluster.name)] + [worker_item(cluster.name, w) for w in cluster.workers]
                await self._record_stops(items)

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
        items, confirmed, dead = [], self._confirmed_items(), self._dead_items()
        listed: set[str] = set()  # every item the database still calls active, dead or not
        for cluster in self.db.active_clusters():
            group = cluster.config.get(CHARGE_KEY)
            if not group:
                continue
            base = {"user": cluster.username, "group": group}
            listed.add(scheduler_item(cluster.name))
            listed.update(worker_item(cluster.name, w) for w in cluster.workers)
            if scheduler_item(cluster.name) not in dead:
                items.append(
                    {
                        "item": scheduler_item(cluster.name),
                        "kind": "dask-scheduler",
                        **base,
                        **self._resources(cluster),
                        "started": _iso(cluster.start_time),
                        "confirmed": scheduler_item(cluster.name) in confirmed,
                    }
                )
            for w in cluster.workers.values():
                if (
                    JobStatus.SUBMITTED <= w.status < JobStatus.STOPPED
                    and worker_item(cluster.name, w.name) not in dead
                ):
                    res = {k: v for k, v in self._resources(cluster, w).items() if v is not None}
                    items.append(
                        {
                            "item": worker_item(cluster.name, w.name),
                            "kind": "dask-worker",
                            **base,
                            **res,
                            "started": _iso(w.start_time),
                            "confirmed": worker_item(cluster.name, w.name) in confirmed,
                        }
                    )
        # an item found dead matters only while the database still lists it: forget the others, so that the set
        # does not grow for as long as the gateway runs
        dead.intersection_update(listed)
        return items

    def _cluster_active(self, name: str) -> bool:
        cluster = self.db.get_cluster(name)
        return cluster is not None and cluster.target <= JobStatus.RUNNING


CHARGE_KEY = "workbench_charge_group"


def scheduler_item(cluster: str) -> str:
    return f"dask-scheduler:{cluster}"


def worker_item(cluster: str, worker: str) -> str:
    return f"dask-worker:{cluster}/{worker}"


def _iso(ms: int | None) -> str | None:
    """dask-gateway's timestamps (ms since the epoch, UTC) as ISO 8601."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat() if ms else None
