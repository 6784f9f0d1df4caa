"""Dask Gateway wiring: authentication through JupyterHub, per-group cluster options, local backend.

dask-gateway-server runs as the JupyterHub-managed service ``dask-gateway-server`` (no URL of
its own); the hub service ``dask-gateway`` is :mod:`workbench.dashguard`, which the hub proxies
``/services/dask-gateway`` to and which forwards to the gateway's HTTP proxy, letting only a
cluster's owner see its dashboard. The gateway serves under ``/services/dask-gateway`` and
requires the token of every caller to carry ``access:services!service=dask-gateway`` (granted by
role to groups whose policy has a ``dask`` section), whatever its own service is called.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.local import LocalBackend, LocalClusterConfig, UnsafeLocalBackend
from dask_gateway_server.options import Float, Integer, Options
from traitlets import Integer as IntTrait
from traitlets import Type, Unicode

from .policy import DaskPolicy, Policy, load_policy
from .runtime import GATEWAY_SERVICE, Runtime, load_or_create_secrets
from .sysusers import chown_tree, ensure_system_user, others_can_execute, system_username

GIB = 2**30


def cluster_options_for(policy: Policy, user_groups: list[str], backend_overrides=None) -> Options:
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


class ClusterCapMixin:
    """Enforce the group's ``dask.max_clusters`` per user, atomically.

    The count of the user's active clusters and the creation of the new one happen with no
    ``await`` in between, so concurrent requests in the gateway's event loop cannot overshoot.
    """

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
        cluster = self.db.create_cluster(user.name, options, config.to_dict())
        self.log.info("Created cluster %s for user %s", cluster.name, user.name)
        self.queue.put(cluster)
        return cluster.name


class WorkbenchLocalBackend(ClusterCapMixin, LocalBackend):
    """dask-gateway's LocalBackend, running each cluster as the hub user's Unix account (``wb-<name>``)."""

    cluster_config_class = Type(
        "workbench.gateway.WorkbenchLocalClusterConfig",
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
        "workbench.gateway.WorkbenchLocalClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )


def configure_gateway(c, runtime: Runtime | None = None, policy: Policy | None = None) -> None:
    """Apply the gateway configuration for ``runtime`` to the traitlets config ``c``."""
    runtime = runtime or Runtime.from_env()
    policy = policy or load_policy(runtime.config)
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

    backend_overrides = None
    if runtime.gateway_backend == "slurm":
        from .gateway_slurm import configure_slurm, slurm_overrides

        configure_slurm(c, policy, runtime)
        backend_overrides = slurm_overrides

    def options(user):
        return cluster_options_for(policy, list(user.groups), backend_overrides)

    c.Backend.cluster_options = options

