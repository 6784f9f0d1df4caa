"""The gateway's Kubernetes backend: dask-gateway's ``KubeBackend`` with the caps and quota every backend has.

:mod:`workbench.gateway.kube` configures it from the policy (and renders its pods offline);
:mod:`workbench.gateway.quota` holds what every backend shares (the ``max_clusters`` refusal, the resources of
schedulers and workers, their admission, the reconcile-and-enforce round). This module holds only the
Kubernetes hooks: where a ``DaskCluster`` object is created, where ``spec.replicas`` is raised, what the watch sees.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.kubernetes.backend import KubeBackend
from dask_gateway_server.models import ClusterStatus
from traitlets import Type

from workbench.gateway.quota import CHARGE_KEY, ClusterQuota, _iso, scheduler_item, worker_item
from workbench.services.quota.client import QuotaUnavailable

__all__ = ["WorkbenchKubeBackend"]


class WorkbenchKubeBackend(ClusterQuota, KubeBackend):
    """dask-gateway's ``KubeBackend`` with the caps and quota of every backend (:class:`workbench.gateway.quota.ClusterQuota`).

    - ``dask.max_clusters`` per user: the backend learns about clusters from a watch (its informer), some
      time after it created them; clusters created by this process and not seen yet, and creations in
      flight, count too, and the check and the reservation happen with no ``await`` in between, so
      concurrent requests cannot overshoot.

    With ``quota_api_url`` set, as the database backends (local, Slurm) do:

    - a new cluster's scheduler is admitted before its ``DaskCluster`` object is created: a refusal (or a
      service that does not answer) fails the request with the message and creates nothing;
    - workers: the controller makes a worker pod for each of the object's ``spec.replicas``, which this
      backend sets from the scheduler's heartbeats. Before it raises ``replicas``, each new worker slot
      (``dask-worker:<cluster>/<n>``, the n-th worker) is admitted (budgets, running-GPU caps); refused
      slots are not requested (tried again at the next heartbeat: a cap frees up) and scaling down or
      stopping the cluster records the stop of the slots above the new count;
    - every ``quota_every`` seconds the running schedulers and worker slots (from the objects' spec) are
      reconciled with the ledger, and clusters that draw on a spent budget are stopped once its grace is
      over. A cluster that ends by itself (idle timeout, a failed scheduler: the controller marks it
      Stopped or Failed) has its rows closed when the watch sees it.
    """

    cluster_config_class = Type(
        "workbench.gateway.kube.WorkbenchKubeClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._starting: dict[str, int] = defaultdict(int)  # creations in flight, per user
        self._unseen: dict[str, set[str]] = defaultdict(set)  # created here, not yet seen by the watch
        self._slots: dict[str, int] = {}  # worker slots admitted per cluster (what spec.replicas asks for)
        self._slot_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._refusals: dict[str, str] = {}  # the last refusal logged per cluster

    def _claimed(self, username: str) -> int:
        seen = getattr(self, "username_to_clusters", {}).get(username, {})
        active = {name for name, c in seen.items() if c.status <= ClusterStatus.RUNNING}
        unseen = self._unseen[username]
        unseen.difference_update(n for n in list(unseen) if n in seen)  # the watch has caught up
        return len(active | unseen) + self._starting[username]

    async def setup(self, app):
        if self.quota_api_url and not self.quota_api_token:
            raise ValueError(
                "WorkbenchKubeBackend.quota_api_url is set but quota_api_token is empty: give the gateway a hub "
                "token with custom:workbench-quota:write (the dask-gateway service's, JUPYTERHUB_API_TOKEN)"
            )
        await super().setup(app)
        if self.quota is not None:
            self._quota_task = asyncio.ensure_future(self._quota_loop())

    async def cleanup(self):
        task = getattr(self, "_quota_task", None)
        if task is not None:
            task.cancel()
        await super().cleanup()

    async def start_cluster(self, user, cluster_options):
        options, config = await self.process_cluster_options(user, cluster_options)
        self.check_cluster_cap(config.max_clusters, self._claimed(user.name))
        self._starting[user.name] += 1
        try:
            obj = self.make_cluster_object(user.name, options, config)
            cluster_name = f"{config.namespace}.{obj['metadata']['name']}"
            if self.quota is not None:
                obj["spec"]["config"][CHARGE_KEY] = self.charge_group(user)
                refusal = await self.scheduler_refusal(cluster_name, user.name, obj["spec"]["config"])
                if refusal is not None:
                    self.log.info("Quota refused cluster %s of %s: %s", cluster_name, user.name, refusal)
                    raise PublicException(refusal)
            self.log.info("Creating cluster %s for user %s", cluster_name, user.name)
            try:
                await self.custom_client.create_namespaced_custom_object(
                    "gateway.dask.org", self.crd_version, config.namespace, "daskclusters", obj
                )
            except BaseException:
                if self.quota is not None:
                    await self.quota.stop(scheduler_item(cluster_name), tries=2, delay=0.5)
                raise
            self._unseen[user.name].add(cluster_name)
        finally:
            self._starting[user.name] -= 1
        return cluster_name

    # -- workers: slots admitted before spec.replicas asks the controller for them ----------------

    def _admitted_slots(self, name: str) -> int:
        if name not in self._slots:  # e.g. after a restart of the gateway: what the object asks for
            obj = self.informer.get(name) if hasattr(self, "informer") else None
            self._slots[name] = int(((obj or {}).get("spec") or {}).get("replicas", 0) or 0)
        return self._slots[name]

    async def scale_slots(self, cluster, wanted: int) -> int:
        """Admit worker slots up to ``wanted`` (or record the stop of those above it); the count to request."""
        async with self._slot_locks[cluster.name]:
            have = self._admitted_slots(cluster.name)
            if wanted < have:
                await self.quota.stop_many([worker_item(cluster.name, str(i)) for i in range(wanted, have)])
                have = wanted
            while have < wanted:
                try:
                    decision = await self.admit_worker(cluster, str(have))
                except QuotaUnavailable as e:
                    self._log_refusal(cluster.name, f"the quota service does not answer: {e}")
                    break
                if not decision.allowed:
                    self._log_refusal(cluster.name, decision.message)
                    break
                have += 1
            self._slots[cluster.name] = have
            return have

    def _log_refusal(self, name: str, message: str) -> None:
        if self._refusals.get(name) != message:  # once per message, not at every heartbeat
            self._refusals[name] = message
            self.log.warning("Workers of cluster %s not started: %s", name, message)

    async def on_cluster_heartbeat(self, cluster_name, msg):
        cluster = self.clusters.get(cluster_name)
        if self.quota is not None and cluster is not None and cluster.config.get(CHARGE_KEY):
            wanted = msg["count"]
            limit = cluster.config.get("cluster_max_workers")
            if limit is not None:
                wanted = min(wanted, limit)
            msg = {**msg, "count": await self.scale_slots(cluster, wanted)}
        await super().on_cluster_heartbeat(cluster_name, msg)

    # -- stops, reconcile ----------------------------------------------------------------------

    async def _record_cluster_stop(self, name: str) -> None:
        slots = self._slots.pop(name, None)
        if slots is None:
            slots = self._admitted_slots(name)
            self._slots.pop(name, None)
        self._refusals.pop(name, None)
        items = [scheduler_item(name)] + [worker_item(name, str(i)) for i in range(slots)]
        await self.quota.stop_many(items, tries=2, delay=0.5)

    async def stop_cluster(self, cluster_name, failed=False):
        known = self.clusters.get(cluster_name)
        await super().stop_cluster(cluster_name, failed=failed)
        if self.quota is not None and (known is None or known.status <= ClusterStatus.RUNNING):
            await self._record_cluster_stop(cluster_name)  # spec.active is false: the controller deletes its pods

    async def sync_cluster(self, cluster_name):
        old = self.clusters.get(cluster_name)
        await super().sync_cluster(cluster_name)
        new = self.clusters.get(cluster_name)
        ended = old is not None and old.status <= ClusterStatus.RUNNING
        ended = ended and (new is None or new.status >= ClusterStatus.STOPPED)
        if self.quota is not None and ended and old.config.get(CHARGE_KEY):
            await self._record_cluster_stop(cluster_name)  # idle timeout, failed scheduler, deleted object

    def running_items(self) -> list[dict]:
        """Schedulers and admitted worker slots of the active clusters, as the ledger's running items."""
        items = []
        for cluster in list(self.clusters.values()):
            group = cluster.config.get(CHARGE_KEY)
            if not group or cluster.status > ClusterStatus.RUNNING:
                continue
            base = {"user": cluster.username, "group": group}
            started = _iso(cluster.start_time)
            sched = {"item": scheduler_item(cluster.name), "kind": "dask-scheduler", **self._resources(cluster)}
            items.append({**sched, **base, "started": started})
            res = {k: v for k, v in self._resources(cluster, "worker").items() if v is not None}
            for i in range(self._admitted_slots(cluster.name)):
                items.append({"item": worker_item(cluster.name, str(i)), "kind": "dask-worker", **base, **res})
        return items

    def _cluster_active(self, name: str) -> bool:
        cluster = self.clusters.get(name)
        return cluster is not None and cluster.status <= ClusterStatus.RUNNING
