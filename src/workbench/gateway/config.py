"""The embedded gateway's configuration (``hub_config/dask_gateway_config.py``): the local or Slurm backend, with
JupyterHub authentication, cluster options per group and the quota service, from the runtime and the policy."""

from __future__ import annotations

from pathlib import Path

from workbench.gateway.fast_start import WORKER_ENVIRONMENT, scheduler_command, worker_command
from workbench.gateway.local import WorkbenchLocalBackend, WorkbenchUnsafeLocalBackend
from workbench.gateway.options import cluster_options_for
from workbench.names import GATEWAY_SERVICE
from workbench.policy import Policy, cached_policy
from workbench.runtime import Runtime, load_or_create_secrets


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
    # a busy machine (a class starting at 09:00, 2 cores) delays a scheduler's heartbeats and first start well past
    # upstream's 30 s / 60 s: a cluster is given up only when it is really gone, not because the machine is loaded
    c.DBBackendBase.cluster_heartbeat_timeout = 120
    c.DBBackendBase.cluster_start_timeout = 180
    c.DBBackendBase.worker_start_timeout = 180
    if not runtime.system_users:  # every cluster runs as this account: its folders stay in the state folder
        clusters = runtime.path("clusters")
        clusters.mkdir(mode=0o700, exist_ok=True)
        c.LocalBackend.clusters_directory = str(clusters)
    # As root, no clusters_directory: the state folder is root's alone (0700), while each user's scheduler
    # and workers must reach their cluster's folder, so every cluster gets a fresh mkdtemp folder under /tmp
    # (random name, sticky /tmp), filled and handed to the user through descriptors (WorkbenchLocalBackend).

    # see workbench.gateway.fast_start for why these commands and the workers' fork start method
    c.ClusterConfig.scheduler_cmd = scheduler_command(venv)
    c.ClusterConfig.worker_cmd = worker_command(venv)
    c.ClusterConfig.environment = {"PATH": f"{venv}:/usr/local/bin:/usr/bin:/bin", **WORKER_ENVIRONMENT}

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
