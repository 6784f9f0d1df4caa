"""The local backend of the embedded gateway: schedulers and workers as local processes of each user's account.

dask-gateway-server runs as the JupyterHub-managed service ``dask-gateway-server`` (no URL of
its own); the hub service ``dask-gateway`` is :mod:`workbench.gateway.dashguard`, which the hub proxies
``/services/dask-gateway`` to and which forwards to the gateway's HTTP proxy, letting only a
cluster's owner see its dashboard. The gateway serves under ``/services/dask-gateway`` and
requires the token of every caller to carry ``access:services!service=dask-gateway`` (granted by
role to groups whose policy has a ``dask`` section), whatever its own service is called.
"""

from __future__ import annotations

import os

from dask_gateway_server.backends.local import LocalBackend, LocalClusterConfig, UnsafeLocalBackend
from traitlets import Integer as IntTrait
from traitlets import Type, Unicode

from workbench.gateway.fast_start import FastStartMixin
from workbench.gateway.quota import ClusterCapMixin
from workbench.sysusers import chown_tree, ensure_system_user, system_username


class WorkbenchLocalClusterConfig(LocalClusterConfig):
    max_clusters = IntTrait(
        0, help="How many active clusters the requesting user may have (from the group's dask.max_clusters)."
    ).tag(config=True)


class WorkbenchLocalBackend(FastStartMixin, ClusterCapMixin, LocalBackend):
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


class WorkbenchUnsafeLocalBackend(FastStartMixin, ClusterCapMixin, UnsafeLocalBackend):
    """All clusters run as the gateway's own user (the embedded mode when not root)."""

    cluster_config_class = Type(
        "workbench.gateway.local.WorkbenchLocalClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )
