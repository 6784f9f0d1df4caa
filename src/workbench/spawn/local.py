"""The local spawner of the embedded mode: single-user JupyterLab servers as local processes.

As root, each hub user runs as their own Unix account (``wb-<name>``, home 0700), so users
cannot read each other's files. Not as root, every server runs as the current user (the hub
says so at start-up): fine for a laptop demo, not for shared use.

What a user may start comes from the policy: the profile (``user_options["profile"]``, the
KubeSpawner convention) must be one of the user's entitled profiles, else the spawn is
refused with 403 before anything starts.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from tornado import web
from traitlets import Bool, Dict, Unicode, default

from workbench.courses.material import prepare_courses, unix_groups_of
from workbench.devcgroup import minors_by_uuid
from workbench.gpus import GpuAllocator, NoFreeGpu
from workbench.limits import Limiter, detect_cgroups, local_limits, own_cgroups
from workbench.policy import Profile
from workbench.serverinfo import server_info_env
from workbench.spawn.common import (
    AdmittedOptionsMixin,
    PolicySpawnerMixin,
    QuotaAdmissionMixin,
    StopsDaskClustersMixin,
    choose_profile,
    dask_environment,
    options_form_html,
)
from workbench.spawn.concurrency import StartSlotMixin
from workbench.spawn.starters import install_starters
from workbench.sysusers import (
    ensure_folder,
    ensure_system_user,
    sync_group_memberships,
    unix_group_name,
)

_ALLOCATORS: dict[str, GpuAllocator] = {}
_LIMITERS: dict[str, Limiter] = {}


class WorkbenchLocalSpawner(
    PolicySpawnerMixin,
    StartSlotMixin,
    AdmittedOptionsMixin,
    QuotaAdmissionMixin,
    StopsDaskClustersMixin,
    LocalProcessSpawner,
):
    """LocalProcessSpawner driven by the platform policy.

    - the spawn form lists only the user's entitled profiles; ``user_options["profile"]`` from the
      form or the REST API is checked against the policy (403 otherwise) before anything starts;
    - CPU and memory limits of the profile are applied (cgroups where available, rlimits otherwise);
    - GPU profiles get devices of their GPU type via ``CUDA_VISIBLE_DEVICES``, never shared;
    - at most ``start_slots`` servers start at once, the others wait in line (:mod:`workbench.spawn.concurrency`).
    """

    system_users = Bool(
        False,
        help="""Run each user's server as their own Unix account (created on first spawn).
        Needs root. When False, servers run as the hub's user with homes under `homes_root`.""",
    ).tag(config=True)

    homes_root = Unicode(
        help="Where homes live when `system_users` is False (one folder per hub user).",
    ).tag(config=True)

    dask_env = Dict(help="Gateway address settings added to every server's environment.").tag(config=True)

    gpus = Dict(help="Local GPU devices by GPU type: {type: [device ids]} (from `workbench up`).").tag(config=True)

    gpu_devices: list[str] = []
    profile_name: str = ""

    # -- policy ----------------------------------------------------------------

    @property
    def home(self) -> str:
        if self.system_users:
            return pwd.getpwnam(self.system_user).pw_dir
        return os.path.join(self.homes_root, self.user.name)

    @property
    def allocator(self) -> GpuAllocator:
        key = self.policy_path
        if key not in _ALLOCATORS:
            _ALLOCATORS[key] = GpuAllocator(self.gpus)
        return _ALLOCATORS[key]

    @property
    def limiter(self) -> Limiter:
        if "default" not in _LIMITERS:
            mode = detect_cgroups()
            _LIMITERS["default"] = Limiter(mode, own=own_cgroups(Path("/proc/self/cgroup").read_text()) if mode else {})
        return _LIMITERS["default"]

    @property
    def server_key(self) -> str:
        return f"{self.user.name}-{self.name}" if self.name else self.user.name

    # -- form --------------------------------------------------------------------

    def _options_form(self, spawner=None):
        allowed = self.policy.profiles_for(self.user_groups)
        if len(allowed) <= 1:
            return ""  # nothing to choose
        return options_form_html(self.policy, self.user_groups)

    @default("options_form")
    def _default_options_form(self):
        return self._options_form

    def options_from_form(self, formdata):
        profile = (formdata.get("profile") or [""])[0]
        # checked again in start(); refusing here shows the message on the spawn page at once
        choose_profile(self.policy, self.user_groups, profile or None)
        return {"profile": profile} if profile else {}

    # -- LocalProcessSpawner hooks ---------------------------------------------

    def make_preexec_fn(self, name):
        join = Limiter.preexec(self._cgroup_dirs, self._limits)
        # `workbench up` runs the hub with umask 077 (its state is private); a user's own files get 022
        if self.system_users:
            setuid = set_user_setuid(self.system_user)

            def preexec():
                join()
                setuid()
                os.umask(0o022)

            return preexec
        home = self.home

        def preexec():
            join()
            os.umask(0o022)
            os.chdir(home)

        return preexec

    def user_env(self, env):
        env["HOME"] = self.home
        env["SHELL"] = "/bin/bash"
        env["USER"] = self.system_user if self.system_users else pwd.getpwuid(os.getuid()).pw_name
        return env

    async def move_certs(self, paths):  # internal_ssl is off in the embedded mode
        return paths

    def get_env(self):
        env = super().get_env()
        env.update(dask_environment(self.policy, self.user_groups, **self.dask_env) if self.dask_env else {})
        profile = self.policy.profiles[self.profile_name]
        env.update(profile.env)
        env.update(self._limits.env(self.limiter.mechanism))
        env["WORKBENCH_PROFILE"] = self.profile_name
        env.update(
            server_info_env(self.policy, self.user_groups, self.profile_name, "embedded", None, self.gpu_devices)
        )
        if profile.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_devices)
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(self.gpu_devices)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def get_state(self):
        state = super().get_state()
        if self.gpu_devices:
            state["gpu_devices"] = list(self.gpu_devices)
        if self.profile_name:
            state["profile"] = self.profile_name
        return state

    def load_state(self, state):
        super().load_state(state)
        self.profile_name = state.get("profile", "")
        self.gpu_devices = list(state.get("gpu_devices", []))
        if self.gpu_devices:
            self.allocator.restore(self.server_key, self.gpu_devices)

    def clear_state(self):
        super().clear_state()
        self.gpu_devices = []

    async def start(self):
        try:
            self.profile_name = self.start_profile()  # options become the default only once admitted (common)
            profile = self.policy.profiles[self.profile_name]
            if self.quota is not None:
                await self._admit()
        except BaseException:
            self.forget_refused_options()
            raise
        try:
            started = await self._start_with_gpus(profile)
        except BaseException:
            self.forget_refused_options()
            if self.quota is not None:
                await self.quota.stop(self.quota_item)
            raise
        self.remember_admitted_options()
        return started

    async def _start_with_gpus(self, profile: Profile):
        if profile.gpu:
            gtype = self.policy.gpu_types[profile.gpu.type]
            try:
                self.gpu_devices = self.allocator.allocate(
                    self.server_key, profile.gpu.type, profile.gpu.count, gtype.display_name
                )
            except NoFreeGpu as e:
                raise web.HTTPError(409, str(e)) from None
        try:
            return await self._start_process(profile)
        except BaseException:
            self.allocator.release(self.server_key)
            self.gpu_devices = []
            self.limiter.remove(self.server_key)
            raise

    async def _start_process(self, profile: Profile):
        kinds = self.policy.kinds_of(self.user_groups)
        if self.system_users:
            entry = ensure_system_user(self.system_user, comment=f"Workbench user {self.user.name}")
            install_starters(entry.pw_dir, kinds, entry.pw_uid, entry.pw_gid)
            self._prepare_shared_folders()
        else:
            Path(self.home).mkdir(parents=True, exist_ok=True)
            install_starters(self.home, kinds)
        await prepare_courses(self)  # course material pulled as the user, course folders (never blocks the start)
        self._limits = local_limits(profile)
        if self.gpu_devices:  # only the GPUs allocated to this server may be opened (device cgroup)
            self._limits, unknown = self._limits.for_devices(self.gpu_devices, minors_by_uuid())
            if unknown:  # MIG slices and pretend GPUs have no /dev/nvidia<N> of their own
                self.log.warning(
                    "No GPU device control for %s's server: %s not among the driver's GPUs (MIG slices and "
                    "pretend GPUs are told apart only by CUDA_VISIBLE_DEVICES)",
                    self.user.name,
                    ", ".join(unknown),
                )
        self._cgroup_dirs = self.limiter.prepare(self.server_key, self._limits)
        self.log.info(
            "Starting %s's server: profile %s, as %s, limits %s (%g CPU, %d bytes)%s",
            self.user.name,
            self.profile_name,
            self.system_user if self.system_users else "the hub's own user",
            self.limiter.mechanism,
            self._limits.cpu,
            self._limits.memory,
            f", GPUs {','.join(self.gpu_devices)}" if self.gpu_devices else "",
        )
        return await super().start()

    def _prepare_shared_folders(self) -> None:
        """Group folders (read-write for members, setgid) and the read-only datasets folder, at the
        same paths as on Kubernetes (``storage.shared`` / ``storage.datasets``)."""
        storage = self.policy.storage
        # memberships follow the policy: groups (and courses taught) the user left are left here
        wanted = unix_groups_of(self.policy, self.user_groups, self.user.name)
        if left := sync_group_memberships(self.system_user, wanted):
            self.log.info("%s (%s) left the Unix group(s) %s", self.user.name, self.system_user, ", ".join(left))
        for group in self.policy.groups_of(self.user_groups):
            ensure_folder(storage.shared.format(group=group), 0o2770, grp.getgrnam(unix_group_name(group)).gr_gid)
        ensure_folder(storage.datasets, 0o755)

    async def stop(self, now=False):
        try:
            await super().stop(now=now)
        finally:
            self.allocator.release(self.server_key)
            self.limiter.remove(self.server_key)
            if self.quota is not None:
                await self.quota.stop(self.quota_item)
            # the default server owns the user's clusters (users without Dask access have none)
            if self._owns_dask_clusters():
                await self._stop_dask_clusters()
