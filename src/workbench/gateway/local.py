"""The local backend of the embedded gateway: schedulers and workers as local processes of each user's account.

dask-gateway-server runs as the JupyterHub-managed service ``dask-gateway-server`` (no URL of
its own); the hub service ``dask-gateway`` is :mod:`workbench.gateway.dashguard`, which the hub proxies
``/services/dask-gateway`` to and which forwards to the gateway's HTTP proxy, letting only a
cluster's owner see its dashboard. The gateway serves under ``/services/dask-gateway`` and
requires the token of every caller to carry ``access:services!service=dask-gateway`` (granted by
role to groups whose policy has a ``dask`` section), whatever its own service is called.

The gateway runs as root; upstream's ``LocalBackend`` opens each process's log file as root at a path
inside the cluster's folder, which the user owns once the cluster runs (``logs`` replaced by a symlink
to ``/etc`` would make root create files there with the worker's output). Here:

- the working folder is made by ``mkdtemp`` (a fresh random name, 0700, root only) and filled
  through descriptors (``mkdirat``, files created ``O_EXCL|O_NOFOLLOW``, ``fchown``); the folder
  itself is handed to the user last, so there is no moment a user can redirect anything;
- each scheduler and worker opens its own log file *after* becoming the user (in the child, before
  exec), so root never opens a path in the user's folder; the child gets umask 022;
- schedulers and workers join a cgroup (or get rlimits) with the cluster's cores and memory, the same
  :class:`workbench.limits.Limiter` the notebook servers use;
- the ports the cluster's processes listen on answer only the owner's uid and the gateway's
  (:mod:`workbench.gateway.portguard`, nftables): synced when a scheduler reports its addresses, every
  ``port_guard_period`` while clusters run, and at every stop; stale rules are flushed at start.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import tempfile
from pathlib import Path

from dask_gateway_server.backends.local import LocalBackend, LocalClusterConfig, UnsafeLocalBackend
from traitlets import Bool, Float, Type, Unicode
from traitlets import Integer as IntTrait

from workbench.gateway.fast_start import FastStartMixin
from workbench.gateway.portguard import Guard, NftPortGuard, ProcSnapshot, listening_endpoints, table_name
from workbench.gateway.quota import ClusterCapMixin
from workbench.limits import Limiter, LocalLimits, detect_cgroups, own_cgroups
from workbench.sysusers import USER_PREFIX, create_file_at, ensure_system_user, open_dir_nofollow, system_username

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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

    user_prefix = Unicode(USER_PREFIX, help="Prefix of the Unix accounts made for hub users.").tag(config=True)

    port_guard = Bool(
        True,
        help="Let only a cluster's owner and the gateway connect to its loopback ports (nftables; needs root "
        "and nft, otherwise a warning is logged and the ports answer every local account).",
    ).tag(config=True)

    port_guard_period = Float(
        1.0, help="Seconds between two looks at the ports of running clusters (new workers, restarted ones)."
    ).tag(config=True)

    nft_command = Unicode("nft", help="The nft command (found on PATH).").tag(config=True)

    def _unix_name(self, hub_name: str) -> str:
        return system_username(hub_name, self.user_prefix)

    _guard: NftPortGuard | None = None

    async def do_setup(self):
        await super().do_setup()
        if not self.port_guard:
            self.log.warning("Port guard disabled by configuration (port_guard = False)")
            return
        self._guard = NftPortGuard(table_name(self.db_url), self.log, self.nft_command)
        if await self._guard.start():
            self.task_pool.spawn(self._port_guard_loop())

    async def do_cleanup(self):
        try:
            await super().do_cleanup()
        finally:
            if self._guard is not None:
                await self._guard.stop()

    def port_guards(self) -> dict[str, Guard]:
        """Cluster name -> where its live processes listen and the uids that may connect."""
        out = {}
        clusters = list(self.db.active_clusters())
        snapshot = ProcSnapshot.take() if clusters else None  # one pass over /proc for all clusters
        for cluster in clusters:
            try:
                uid = pwd.getpwnam(self._unix_name(cluster.username)).pw_uid
            except KeyError:
                continue
            pids = [cluster.state.get("pid")] + [w.state.get("pid") for w in cluster.workers.values()]
            endpoints = listening_endpoints([p for p in pids if p], uid, snapshot=snapshot)
            out[cluster.name] = Guard(frozenset(endpoints), frozenset({uid, os.geteuid()}))
        return out

    async def sync_port_guard(self) -> None:
        if self._guard is not None and self._guard.enabled:
            await self._guard.sync(self.port_guards())

    async def _port_guard_loop(self):
        while True:
            await asyncio.sleep(self.port_guard_period)
            try:
                await self.sync_port_guard()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("Port guard: could not sync", exc_info=exc)

    async def on_cluster_heartbeat(self, cluster_name, msg):
        await super().on_cluster_heartbeat(cluster_name, msg)
        await self.sync_port_guard()  # the scheduler has just said where it listens

    _limiter: Limiter | None = None

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            mode = detect_cgroups()
            own = own_cgroups(Path("/proc/self/cgroup").read_text()) if mode else {}
            WorkbenchLocalBackend._limiter = Limiter(mode, own=own)
        return self._limiter

    def set_file_permissions(self, paths, username):  # pragma: nocover - never called
        raise AssertionError("setup_working_directory sets ownership through descriptors")

    def setup_working_directory(self, cluster):
        entry = ensure_system_user(self._unix_name(cluster.username))
        uid, gid = entry.pw_uid, entry.pw_gid
        # a fresh folder (random name, 0700) that only root can enter until it is handed over, last
        workdir = tempfile.mkdtemp(prefix="dask-", suffix=f"-{cluster.name}", dir=self.clusters_directory or None)
        top = open_dir_nofollow(workdir)
        try:
            for sub, files in ((".certs", {"dask.crt": cluster.tls_cert, "dask.pem": cluster.tls_key}), ("logs", {})):
                os.mkdir(sub, 0o700, dir_fd=top)
                fd = open_dir_nofollow(sub, dir_fd=top)
                try:
                    for name, data in files.items():
                        if not create_file_at(fd, name, data, uid, gid, 0o600):
                            raise RuntimeError(f"{workdir}/{sub}/{name} appeared in a fresh folder")
                    os.fchown(fd, uid, gid)
                finally:
                    os.close(fd)
            os.fchown(top, uid, gid)
        finally:
            os.close(top)
        self.log.debug("Working directory %s for cluster %s created", workdir, cluster.name)
        return workdir

    def _limits_for(self, cluster, name: str) -> LocalLimits:
        cfg = cluster.config
        # local schedulers and workers are never given a GPU: every GPU device is denied to them
        if name == "scheduler":
            return LocalLimits(cpu=float(cfg.scheduler_cores), memory=int(cfg.scheduler_memory), gpus=frozenset())
        return LocalLimits(cpu=float(cfg.worker_cores), memory=int(cfg.worker_memory), gpus=frozenset())

    @staticmethod
    def _cgroup_key(cluster_name: str, name: str) -> str:
        return f"dask-{cluster_name}-{name}"

    async def start_process(self, cluster, cmd, env, name):
        limits = self._limits_for(cluster, name)
        key = self._cgroup_key(cluster.name, name)
        dirs = self.limiter.prepare(key, limits)
        env = {**env, **limits.env(self.limiter.mechanism)}
        self.log.info(
            "Starting %s of cluster %s as %s: limits %s (%g CPU, %d bytes)",
            name,
            cluster.name,
            self._unix_name(cluster.username),
            self.limiter.mechanism,
            limits.cpu,
            limits.memory,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                preexec_fn=self._preexec(cluster, Limiter.preexec(dirs, limits), f"logs/{name}.log"),
                start_new_session=True,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            self.limiter.remove(key)
            raise
        return proc.pid

    def make_preexec_fn(self, cluster):  # pragma: nocover - upstream's hook; start_process uses _preexec
        return self._preexec(cluster, lambda: None, None)

    def _preexec(self, cluster, join, log_name):  # pragma: nocover - runs in the child
        from jupyterhub.spawner import set_user_setuid

        setuid = set_user_setuid(self._unix_name(cluster.username), chdir=False)
        workdir = cluster.state["workdir"]

        def preexec():
            join()  # as root: the cgroup (or rlimits)
            setuid()
            os.umask(0o022)  # the services run with 077; the user's own files get the usual mode
            os.chdir(workdir)
            if log_name:  # opened as the user: a symlink here leads only where the user may write
                fd = os.open(log_name, _LOG_FLAGS, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)

        return preexec

    async def do_stop_worker(self, worker):
        try:
            await super().do_stop_worker(worker)
        finally:
            self.limiter.remove(self._cgroup_key(worker.cluster.name, f"worker-{worker.name}"))
            await self.sync_port_guard()

    async def do_stop_cluster(self, cluster):
        try:
            await super().do_stop_cluster(cluster)
        finally:
            self.limiter.remove(self._cgroup_key(cluster.name, "scheduler"))
            await self.sync_port_guard()

    def get_env(self, cluster):
        env = super().get_env(cluster)
        entry = ensure_system_user(self._unix_name(cluster.username))
        env["USER"] = entry.pw_name
        env["HOME"] = entry.pw_dir
        return env


class WorkbenchUnsafeLocalBackend(FastStartMixin, ClusterCapMixin, UnsafeLocalBackend):
    """All clusters run as the gateway's own user (the embedded mode when not root)."""

    async def do_setup(self):
        await super().do_setup()
        self.log.warning(
            "Port guard off: clusters run as the gateway's own account (not root), so their dashboards and "
            "worker ports on 127.0.0.1 answer every local account; see docs/security.md"
        )

    cluster_config_class = Type(
        "workbench.gateway.local.WorkbenchLocalClusterConfig",
        klass="dask_gateway_server.backends.base.ClusterConfig",
        help="The cluster config class to use",
        config=True,
    )
