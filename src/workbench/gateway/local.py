"""Dask Gateway wiring: authentication through JupyterHub, per-group cluster options, local backend.

dask-gateway-server runs as the JupyterHub-managed service ``dask-gateway-server`` (no URL of
its own); the hub service ``dask-gateway`` is :mod:`workbench.gateway.dashguard`, which the hub proxies
``/services/dask-gateway`` to and which forwards to the gateway's HTTP proxy, letting only a
cluster's owner see its dashboard. The gateway serves under ``/services/dask-gateway`` and
requires the token of every caller to carry ``access:services!service=dask-gateway`` (granted by
role to groups whose policy has a ``dask`` section), whatever its own service is called.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.db_base import JobStatus
from dask_gateway_server.backends.local import LocalBackend, LocalClusterConfig, UnsafeLocalBackend
from dask_gateway_server.options import Float, Integer, Mapping, Options
from traitlets import Float as FloatTrait
from traitlets import Integer as IntTrait
from traitlets import Type, Unicode
from traitlets.config import LoggingConfigurable

from workbench.policy import DaskPolicy, Policy, cached_policy
from workbench.services.quota.client import QuotaClient, QuotaUnavailable
from workbench.runtime import GATEWAY_SERVICE, Runtime, load_or_create_secrets
from workbench.sysusers import chown_tree, ensure_system_user, others_can_execute, system_username

GIB = 2**30


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: environment variables a user may not set for their cluster: the workbench and dask-gateway set them
RESERVED_ENV = frozenset({"PATH", "HOME", "USER", "SHELL", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONHOME",
                          "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"})
RESERVED_ENV_PREFIXES = ("DASK_GATEWAY", "DASK_DISTRIBUTED__COMM__", "JUPYTERHUB_", "SLURM_", "WORKBENCH_")
MAX_ENV = 64


def check_environment(env: dict) -> dict[str, str]:
    """The ``environment`` option, checked: names, string values, no variable the workbench sets (pure)."""
    if len(env) > MAX_ENV:
        raise ValueError(f"environment: at most {MAX_ENV} variables, got {len(env)}")
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"environment: {name!r} is not a variable name (letters, digits, _; not first a digit)")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"environment: {name} is set by the workbench for every cluster; choose another name")
        if not isinstance(value, str):
            raise ValueError(f"environment: the value of {name} must be a string (quote it), got {value!r}")
        if len(value) > 4096:
            raise ValueError(f"environment: the value of {name} is longer than 4096 characters")
    return dict(env)


def cluster_options_for(policy: Policy, user_groups: list[str], backend_overrides=None,
                        base_environment: dict[str, str] | None = None) -> Options:
    """Cluster options a user may set, bounded by their group's Dask policy (pure).

    A user none of whose groups has a Dask policy sees no options, and creating a cluster is
    refused with a message saying why. Groups with ``gpu_workers`` also get ``worker_gpus``.
    ``backend_overrides(group, dask_policy, options) -> dict`` adds backend-specific settings
    (e.g. Slurm partition, account, GRES).
    """
    group = policy.dask_group_for(user_groups)
    if group is None:
        groups = ", ".join(policy.groups_of(user_groups)) or "none"

        def refuse(options, user=None):
            raise ValueError(
                f"Your groups ({groups}) may not use Dask Gateway: none of them has a 'dask' section in the "
                "platform policy. Ask the platform team to add one."
            )

        return Options(handler=refuse)
    dask = policy.groups[group].dask
    # round down to 0.01 GiB so that the largest choice never exceeds the policy
    max_mem_gib = math.floor(dask.worker_max_memory / GIB * 100) / 100
    min_mem_gib = min(0.25, max_mem_gib)

    def handler(options, user=None):
        config = cluster_config_for(dask, options.worker_cores, options.worker_memory)
        env = {**(base_environment or {}), **check_environment(options.environment)}
        if env:  # the user's variables on top of the gateway's own (which they may not replace)
            config["environment"] = env
        if backend_overrides is not None:
            config.update(backend_overrides(group, dask, options))
        return config

    fields = [
        Integer("worker_cores", default=1, min=1, max=int(dask.worker_max_cores), label="Worker cores"),
        Float(
            "worker_memory",
            default=min(1.0, max_mem_gib),
            min=min_mem_gib,
            max=max_mem_gib,
            label="Worker memory (GiB)",
        ),
    ]
    if dask.gpu_workers:
        gtype = policy.gpu_types[dask.gpu_type]
        fields.append(
            Integer(
                "worker_gpus",
                default=0,
                min=0,
                max=dask.worker_max_gpus,
                label=f"GPUs per worker ({gtype.display_name or dask.gpu_type})",
            )
        )
    fields.append(Mapping("environment", default={}, label="Environment variables of the scheduler and workers"))
    return Options(*fields, handler=handler)


SCHEDULER_CORES = 1
SCHEDULER_MEMORY = GIB


def cluster_config_for(dask: DaskPolicy, worker_cores: int, worker_memory_gib: float) -> dict:
    """Cluster configuration overrides for validated options under a group's policy (pure).

    The policy's ``max_cores``/``max_memory`` are what the workers may use; dask-gateway's
    cluster limits also count the scheduler, so its share is added on top.
    """
    return {
        "worker_cores": worker_cores,
        "worker_memory": int(worker_memory_gib * GIB),
        "scheduler_cores": SCHEDULER_CORES,
        "scheduler_memory": SCHEDULER_MEMORY,
        "cluster_max_workers": dask.max_workers,
        "cluster_max_cores": dask.max_cores + SCHEDULER_CORES,
        "cluster_max_memory": dask.max_memory + SCHEDULER_MEMORY,
        "idle_timeout": dask.idle_timeout,
        "max_clusters": dask.max_clusters,
    }


class WorkbenchLocalClusterConfig(LocalClusterConfig):
    max_clusters = IntTrait(
        0, help="How many active clusters the requesting user may have (from the group's dask.max_clusters)."
    ).tag(config=True)


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
    policy_path = Unicode("", help="The platform YAML (which group a user's clusters are charged to).").tag(
        config=True
    )

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
            return {"cpu": float(cluster.config.get("scheduler_cores", SCHEDULER_CORES)),
                    "memory": int(cluster.config.get("scheduler_memory", SCHEDULER_MEMORY))}
        gpus = int(cluster.config.get("worker_gpus", 0) or 0)
        dask = self.policy.groups[group].dask if group in self.policy.groups else None
        return {"cpu": float(cluster.config.get("worker_cores", 1)), "memory": int(cluster.config.get("worker_memory", 0)),
                "gpu_count": gpus, "gpu_type": dask.gpu_type if gpus and dask is not None else None}

    async def _admit_scheduler(self, cluster) -> None:
        group = cluster.config.get(CHARGE_KEY) or ""
        try:
            decision = await self.quota.admit(
                item=scheduler_item(cluster.name), kind="dask-scheduler", user=cluster.username, group=group,
                needs_gpu_budget=bool(cluster.config.get("worker_gpus")) or None, **self._resources(cluster),
            )
        except QuotaUnavailable as e:
            self.log.error("Refusing cluster %s of %s: %s", cluster.name, cluster.username, e)
            decision = None
        if decision is None or not decision.allowed:
            self.db.update_cluster(cluster, target=JobStatus.FAILED)
            self.queue.put(cluster)  # CREATED -> FAILED, nothing started
            raise PublicException(
                decision.message if decision is not None
                else "The quota service does not answer, so no Dask cluster can start now; try again in a minute."
            )

    async def do_start_worker(self, worker):
        if self.quota is not None:
            cluster = worker.cluster
            try:
                decision = await self.quota.admit(
                    item=worker_item(cluster.name, worker.name), kind="dask-worker", user=cluster.username,
                    group=cluster.config.get(CHARGE_KEY) or "", **self._resources(cluster, worker),
                )
            except QuotaUnavailable as e:
                raise RuntimeError(f"worker {worker.name} not started: {e}") from None
            if not decision.allowed:
                self.log.warning("Quota refused worker %s of cluster %s (%s): %s", worker.name, cluster.name,
                                 decision.reason, decision.message)
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
                await self.quota.stop(worker_item(worker.cluster.name, worker.name), tries=2, delay=0.5)

    async def do_stop_cluster(self, cluster):
        try:
            await super().do_stop_cluster(cluster)
        finally:
            if self.quota is not None:  # its workers too: a bulk shutdown does not stop them one by one
                items = [scheduler_item(cluster.name)] + [worker_item(cluster.name, w) for w in cluster.workers]
                await self.quota.stop_many(items, tries=2, delay=0.5)

    async def do_setup(self):
        await super().do_setup()
        if self.quota is not None:
            self.task_pool.spawn(self._quota_loop())

    def running_items(self) -> list[dict]:
        """Schedulers and (submitted or running) workers of the active clusters, as the ledger's running items."""
        items = []
        for cluster in self.db.active_clusters():
            group = cluster.config.get(CHARGE_KEY)
            if not group:
                continue
            base = {"user": cluster.username, "group": group}
            items.append({"item": scheduler_item(cluster.name), "kind": "dask-scheduler", **base,
                          **self._resources(cluster), "started": _iso(cluster.start_time)})
            for w in cluster.workers.values():
                if JobStatus.SUBMITTED <= w.status < JobStatus.STOPPED:
                    res = {k: v for k, v in self._resources(cluster, w).items() if v is not None}
                    items.append({"item": worker_item(cluster.name, w.name), "kind": "dask-worker", **base, **res,
                                  "started": _iso(w.start_time)})
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
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat() if ms else None


class WorkbenchLocalBackend(ClusterCapMixin, LocalBackend):
    """dask-gateway's LocalBackend, running each cluster as the hub user's Unix account (``wb-<name>``)."""

    cluster_config_class = Type(
        "workbench.gateway.local.WorkbenchLocalClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )

    user_prefix = Unicode("wb-", help="Prefix of the Unix accounts made for hub users.").tag(config=True)

    def _unix_name(self, hub_name: str) -> str:
        return system_username(hub_name, self.user_prefix)

    def set_file_permissions(self, paths, username):
        # upstream extends its path list with the characters of each cert path
        # (``paths.extend(path)``) and would chown "/" as root; chown the workdir tree instead.
        entry = ensure_system_user(self._unix_name(username))
        chown_tree(paths[0], entry.pw_uid, entry.pw_gid)

    def make_preexec_fn(self, cluster):  # pragma: nocover - runs in the child
        from jupyterhub.spawner import set_user_setuid

        setuid = set_user_setuid(self._unix_name(cluster.username), chdir=False)
        workdir = cluster.state["workdir"]

        def preexec():
            setuid()
            os.chdir(workdir)

        return preexec

    def get_env(self, cluster):
        env = super().get_env(cluster)
        entry = ensure_system_user(self._unix_name(cluster.username))
        env["USER"] = entry.pw_name
        env["HOME"] = entry.pw_dir
        return env


class WorkbenchUnsafeLocalBackend(ClusterCapMixin, UnsafeLocalBackend):
    """All clusters run as the gateway's own user (the embedded mode when not root)."""

    cluster_config_class = Type(
        "workbench.gateway.local.WorkbenchLocalClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )


def configure_gateway(c, runtime: Runtime | None = None, policy: Policy | None = None) -> None:
    """Apply the gateway configuration for ``runtime`` to the traitlets config ``c``."""
    runtime = runtime or Runtime.from_env()
    policy = policy or cached_policy(runtime.config)  # the same object the backend's policy_path gives
    secrets = load_or_create_secrets(runtime.state_dir)
    venv = Path(runtime.venv_bin)

    c.DaskGateway.address = f"127.0.0.1:{runtime.gateway_port}"
    c.Proxy.address = f"127.0.0.1:{runtime.gateway_http_port}"
    c.Proxy.tcp_address = f"127.0.0.1:{runtime.gateway_tcp_port}"
    # the hub service users reach (the guard in front), not this process's own service name
    c.Proxy.prefix = f"/services/{GATEWAY_SERVICE}"
    c.DaskGateway.log_level = "INFO"

    c.DaskGateway.authenticator_class = "dask_gateway_server.auth.JupyterHubAuthenticator"
    c.JupyterHubAuthenticator.jupyterhub_api_url = f"http://127.0.0.1:{runtime.hub_port}/hub/api"
    c.JupyterHubAuthenticator.jupyterhub_service_name = GATEWAY_SERVICE
    c.JupyterHubAuthenticator.use_service_access_scopes = True

    backend = WorkbenchLocalBackend if runtime.system_users else WorkbenchUnsafeLocalBackend
    c.DaskGateway.backend_class = f"{backend.__module__}.{backend.__name__}"
    c.WorkbenchLocalBackend.user_prefix = runtime.user_prefix
    c.DBBackendBase.db_url = f"sqlite:///{runtime.path('dask-gateway.sqlite')}"
    c.DBBackendBase.db_encrypt_keys = [secrets["gateway_db_key"]]
    c.DBBackendBase.stop_clusters_on_shutdown = True
    clusters = runtime.path("clusters")
    clusters.mkdir(mode=0o711, exist_ok=True)
    os.chmod(clusters, 0o711)
    if others_can_execute(clusters)[0]:
        c.LocalBackend.clusters_directory = str(clusters)
    # else: per-cluster temporary folders under /tmp, which the users' processes can reach

    c.ClusterConfig.scheduler_cmd = [str(venv / "dask"), "scheduler"]
    c.ClusterConfig.worker_cmd = [str(venv / "dask"), "worker"]
    c.ClusterConfig.environment = {"PATH": f"{venv}:/usr/local/bin:/usr/bin:/bin"}

    c.ClusterCapMixin.policy_path = runtime.config
    if runtime.quota_port:  # clusters are admitted by, and accounted with, the quota service
        c.ClusterCapMixin.quota_api_url = f"http://127.0.0.1:{runtime.quota_port}/services/quota/api"
        c.ClusterCapMixin.quota_api_token = secrets["gateway_api_token"]  # the `dask-gateway` service: quota writer
        c.ClusterCapMixin.quota_every = runtime.quota_every

    backend_overrides = None
    if runtime.gateway_backend == "slurm":
        from workbench.gateway.slurm import configure_slurm, slurm_overrides

        configure_slurm(c, policy, runtime)
        backend_overrides = slurm_overrides

    base_env = dict(c.ClusterConfig.environment)

    def options(user):
        return cluster_options_for(policy, list(user.groups), backend_overrides, base_environment=base_env)

    c.Backend.cluster_options = options

