"""The platform policy on Kubernetes: KubeSpawner settings built by pure functions.

Like kubespawner's ``objects.py``, the ``kubespawner_*`` / ``*_for`` functions here take the
policy (and the user's groups) and return plain dicts, with no I/O, so they are tested against
literal dicts. Only :func:`render_pod` touches the outside world, and only to make a throw-away
placeholder kube config so that a real KubeSpawner can be built offline.

How a Kubernetes hub config uses this module (see :func:`kube_hub_settings`)::

    from workbench.settings import apply_settings
    from workbench.spawn.kube import kube_hub_settings
    from workbench.policy import load_policy

    policy = load_policy("/etc/workbench/platform.yaml")
    apply_settings(c, kube_hub_settings(policy, "/etc/workbench/platform.yaml"))

which sets ``c.JupyterHub.spawner_class`` to :class:`WorkbenchKubeSpawner` and gives it
``policy_path`` plus the traits common to all pods (:func:`kubespawner_settings`). The spawner's
``profile_list`` defaults to :func:`make_profile_list` of that policy, so each user is offered only
their entitled profiles. With a plain ``KubeSpawner`` instead, set
``c.KubeSpawner.profile_list = make_profile_list(policy)`` and the settings yourself, but then a
request for a profile outside the user's list is a 500 ("No such profile") instead of a 403.

Group-dependent volumes (each of the user's groups' shared folder) are applied **in the
profile_list callable**: every entry of :func:`profile_list_for` carries them in its
``kubespawner_override``. KubeSpawner *merges* dict-valued overrides into the spawner's traits, so
they are added to the home and datasets volumes of :func:`kubespawner_settings`, which are
dicts keyed by volume name for that reason; keep ``volumes`` / ``volume_mounts`` dicts (a list set
elsewhere would be replaced by the override, not extended).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from kubespawner import KubeSpawner
from traitlets import Bool, Instance, Unicode, default

from workbench.courses.material import courses_of, material_pulls, materials_path, pull_env, pull_script, teaches
from workbench.policy import Policy, cached_policy
from workbench.serverinfo import server_info_env
from workbench.spawn.common import (
    AdmittedOptionsMixin,
    QuotaAdmissionMixin,
    StopsDaskClustersMixin,
    choose_profile,
    describe_profile,
)

__all__ = [
    "COURSE_CLAIM",
    "HOME_MOUNT",
    "WorkbenchKubeSpawner",
    "course_volumes",
    "group_volumes",
    "kube_hub_settings",
    "kubespawner_profile",
    "kubespawner_settings",
    "make_profile_list",
    "material_init_container",
    "profile_description",
    "profile_list_for",
    "render_pod",
    "render_pod_async",
]

#: where the home volume is mounted: the non-root user of the workbench images (docker-stacks' jovyan)
HOME_MOUNT = "/home/jovyan"
NB_UID = 1000
NB_GID = 1000
FS_GID = 100  # docker-stacks' "users" group: owns the mounted volumes
#: the PVC of each course's materials folder (``{course}``: the course group; ReadWriteMany, made by the platform team)
COURSE_CLAIM = "workbench-course-{course}"


# ---------------------------------------------------------------------------
# Pure builders
# ---------------------------------------------------------------------------


def profile_description(policy: Policy, name: str) -> str:
    """GPU type and count, CPU, memory and image of a profile, then its own description (pure)."""
    facts = describe_profile(policy, name)
    own = policy.profiles[name].description
    return f"{facts} — {own}" if own else facts


def kubespawner_profile(policy: Policy, name: str) -> dict[str, Any]:
    """One KubeSpawner ``profile_list`` entry for the policy's profile ``name`` (pure).

    The override sets the image, CPU and memory guarantee and limit, the profile's environment and,
    for a GPU profile, the GPU resource (a MIG type's own resource name, e.g.
    ``nvidia.com/mig-1g.10gb``) with the GPU type's node selector and tolerations. Tolerations are a
    dict keyed ``gpu-<type>-<n>`` so that KubeSpawner merges them with tolerations set elsewhere.
    """
    prof = policy.profiles[name]
    override: dict[str, Any] = {
        "image": policy.images[prof.image].image,
        "cpu_guarantee": prof.cpu,
        "cpu_limit": prof.cpu,
        "mem_guarantee": prof.memory,
        "mem_limit": prof.memory_limit or prof.memory,
        "environment": {**prof.env, "WORKBENCH_PROFILE": name},
    }
    if prof.gpu:
        gtype = policy.gpu_types[prof.gpu.type]
        override["extra_resource_limits"] = {gtype.resource: str(prof.gpu.count)}
        override["extra_resource_guarantees"] = {gtype.resource: str(prof.gpu.count)}
        if gtype.node_selector:
            override["node_selector"] = dict(gtype.node_selector)
        if gtype.tolerations:
            override["tolerations"] = {f"gpu-{prof.gpu.type}-{i}": dict(t) for i, t in enumerate(gtype.tolerations)}
    return {
        "display_name": prof.display_name or name,
        "description": profile_description(policy, name),
        "slug": name,
        "kubespawner_override": override,
    }


def _volume_name(prefix: str, group: str) -> str:
    """A pod volume name (a DNS label, at most 63 characters) for a group's volume."""
    name = f"{prefix}-{group}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"{name[: 63 - 9].rstrip('-')}-{digest}"


def group_volumes(policy: Policy, user_groups: Iterable[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(volumes, volume_mounts)`` for the shared folders of the user's policy groups (pure).

    Each group's PVC (``storage.shared_claim``) is mounted read-write at ``storage.shared`` with the
    group's name, the same path as in the embedded mode. Both dicts are keyed by volume name, in the
    form KubeSpawner's ``volumes`` / ``volume_mounts`` accept and merge.
    """
    storage = policy.storage
    volumes: dict[str, dict] = {}
    mounts: dict[str, dict] = {}
    for group in policy.groups_of(user_groups):
        vname = _volume_name("shared", group)
        volumes[vname] = {
            "name": vname,
            "persistentVolumeClaim": {"claimName": storage.shared_claim.format(group=group)},
        }
        mounts[vname] = {"name": vname, "mountPath": storage.shared.format(group=group)}
    return volumes, mounts


def course_volumes(
    policy: Policy, user_groups: Iterable[str], username: str | None = None
) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(volumes, volume_mounts)`` for the materials folders of the user's courses (pure).

    Each course's PVC (:data:`COURSE_CLAIM`) is mounted at ``storage.courses``, the same path as in
    the embedded mode: read-only for students, read-write for the course's instructors (by hub
    user name, ``groups.<course>.instructors``). Keyed by volume name like :func:`group_volumes`.
    """
    volumes: dict[str, dict] = {}
    mounts: dict[str, dict] = {}
    for course in courses_of(policy, user_groups, username):
        vname = _volume_name("materials", course)
        claim = {"claimName": COURSE_CLAIM.format(course=course)}
        volumes[vname] = {"name": vname, "persistentVolumeClaim": claim}
        mounts[vname] = {"name": vname, "mountPath": materials_path(policy, course)}
        if username is None or not teaches(policy, course, username):
            claim["readOnly"] = mounts[vname]["readOnly"] = True
    return volumes, mounts


def material_init_container(
    policy: Policy, user_groups: Iterable[str], profile: str, username: str | None = None
) -> dict[str, Any] | None:
    """An init container pulling the user's course material into ``~/<course>`` (None: no material) (pure).

    It runs :func:`workbench.courses.material.pull_script` with ``gitpuller`` of the profile's own image
    (the workbench images ship nbgitpuller) as the notebook user, on the home volume, before the
    notebook starts; it always exits 0, so a failed pull leaves a note in the course folder and
    never keeps the pod from starting. Locked down like the notebook container; its resources are
    the profile's (an init container's requests do not add to the pod's).
    """
    pulls = material_pulls(policy, courses_of(policy, user_groups, username))
    if not pulls:
        return None
    prof = policy.profiles[profile]
    env = pull_env(HOME_MOUNT, "")
    del env["PATH"]  # the image's own
    return {
        "name": "course-material",
        "image": policy.images[prof.image].image,
        # KubeSpawner expands {placeholders} in init containers: keep the script's braces literal
        "command": [
            "sh",
            "-c",
            pull_script(pulls, HOME_MOUNT, report_failures=False).replace("{", "{{").replace("}", "}}"),
        ],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "workingDir": HOME_MOUNT,
        "volumeMounts": [{"name": "home", "mountPath": HOME_MOUNT}],
        "securityContext": {
            "runAsUser": NB_UID,
            "runAsGroup": NB_GID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": prof.cpu, "memory": prof.memory},
            "limits": {"cpu": prof.cpu, "memory": prof.memory_limit or prof.memory},
        },
    }


def profile_list_for(policy: Policy, user_groups: Iterable[str], username: str | None = None) -> list[dict[str, Any]]:
    """The ``profile_list`` of a member of ``user_groups``: entitled profiles only, in policy order (pure).

    The first entry is the default. Every entry's override also mounts the shared folders of the
    user's groups (:func:`group_volumes`) and the materials folders of their courses
    (:func:`course_volumes`, writable for ``username`` where they teach), whichever profile is
    picked, and pulls their courses' git material (:func:`material_init_container`, keyed
    ``course-material`` in ``init_containers`` so that KubeSpawner merges it).
    """
    user_groups = list(user_groups)
    out = []
    for i, name in enumerate(policy.profiles_for(user_groups)):
        entry = kubespawner_profile(policy, name)
        volumes, mounts = group_volumes(policy, user_groups)
        cvolumes, cmounts = course_volumes(policy, user_groups, username)
        volumes, mounts = {**volumes, **cvolumes}, {**mounts, **cmounts}
        if volumes:
            entry["kubespawner_override"]["volumes"] = volumes
            entry["kubespawner_override"]["volume_mounts"] = mounts
        init = material_init_container(policy, user_groups, name, username)
        if init:
            entry["kubespawner_override"]["init_containers"] = {init["name"]: init}
        if i == 0:
            entry["default"] = True
        out.append(entry)
    return out


def make_profile_list(policy: Policy):
    """An async ``profile_list(spawner)`` callable for ``c.KubeSpawner.profile_list``.

    It reads the groups of ``spawner.user`` and returns :func:`profile_list_for`; a user whose
    groups may start nothing gets a 403 (KubeSpawner would otherwise start a pod with its defaults
    when the list is empty).
    """

    async def profile_list(spawner) -> list[dict[str, Any]]:
        groups = [g.name for g in spawner.user.groups]
        choose_profile(policy, groups, None)  # 403 when no group of the user may start a server
        return profile_list_for(policy, groups, getattr(spawner.user, "name", None))

    return profile_list


def kubespawner_settings(policy: Policy) -> dict[str, Any]:
    """KubeSpawner traits common to every notebook pod (pure).

    Non-root (uid 1000, gid 1000, fsGroup 100, no privilege escalation, all capabilities dropped,
    RuntimeDefault seccomp: the "restricted" Pod Security Standard), no service account token, a
    home PVC per user (``storage.home_size``, ``storage.storage_class``) at ``/home/jovyan`` and the
    datasets PVC (``storage.datasets_claim``) read-only at ``storage.datasets``. Group shared
    folders depend on the user and come from the profile list (:func:`group_volumes`).
    """
    storage = policy.storage
    settings: dict[str, Any] = {
        "uid": NB_UID,
        "gid": NB_GID,
        "fs_gid": FS_GID,
        "allow_privilege_escalation": False,
        "pod_security_context": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "container_security_context": {"runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "automount_service_account_token": False,
        "storage_pvc_ensure": True,
        "pvc_name_template": "claim-{user_server}",
        "storage_capacity": storage.home_size,
        "storage_access_modes": ["ReadWriteOnce"],
        "volumes": {
            "home": {"name": "home", "persistentVolumeClaim": {"claimName": "{pvc_name}"}},
            "datasets": {
                "name": "datasets",
                "persistentVolumeClaim": {"claimName": storage.datasets_claim, "readOnly": True},
            },
        },
        "volume_mounts": {
            "home": {"name": "home", "mountPath": HOME_MOUNT},
            "datasets": {"name": "datasets", "mountPath": storage.datasets, "readOnly": True},
        },
    }
    if storage.storage_class is not None:
        settings["storage_class"] = storage.storage_class
    return settings


def kube_hub_settings(policy: Policy, policy_path: str) -> dict[str, dict[str, Any]]:
    """``{section: {trait: value}}`` wiring :class:`WorkbenchKubeSpawner` into a hub (pure).

    Apply with ``workbench.embedded.hub.apply_settings(c, ...)``; ``policy_path`` is where the hub pod
    reads the platform YAML (the spawner loads it from there).
    """
    return {
        "JupyterHub": {"spawner_class": f"{WorkbenchKubeSpawner.__module__}.{WorkbenchKubeSpawner.__name__}"},
        "WorkbenchKubeSpawner": {"policy_path": policy_path, **kubespawner_settings(policy)},
    }


# ---------------------------------------------------------------------------
# The spawner
# ---------------------------------------------------------------------------


class WorkbenchKubeSpawner(AdmittedOptionsMixin, QuotaAdmissionMixin, StopsDaskClustersMixin, KubeSpawner):
    """KubeSpawner that enforces the platform policy on the server.

    ``profile_list`` defaults to the user's entitled profiles (:func:`make_profile_list`). The
    requested profile (``user_options["profile"]``, from the form or the REST API) is checked
    against the policy before KubeSpawner loads it: a profile the user's groups may not use, or
    any spawn by a user in no entitled group, is refused with a 403 naming the allowed profiles
    (stock KubeSpawner raises a ValueError for an unknown slug, a 500, and starts a pod with its
    defaults when the list is empty). Options become the user's default only once admitted, and course
    members' servers admit their instructors' tokens (:class:`workbench.spawn.common.AdmittedOptionsMixin`).
    With ``quota_api_url`` set (:class:`workbench.spawn.common.QuotaAdmissionMixin`, as the local spawner), the quota
    service admits the start before any Kubernetes object is made (a refusal is a 403 with its message, a service that
    does not answer a 503) and the stop is recorded. With ``gateway_api_url`` set, stopping a user's default server stops their Dask clusters too.
    """

    profile_name: str = ""
    _quota_starting: bool = False  # KubeSpawner stops a conflicting pod inside start: not this server's stop

    policy_path = Unicode(
        "",
        help="""Path of the platform YAML (loaded once per process). Ignored when `policy` is given.""",
    ).tag(config=True)

    policy = Instance(
        Policy,
        help="""The platform policy; by default loaded from `policy_path`.""",
    )

    @default("policy")
    def _default_policy(self) -> Policy:
        if not self.policy_path:
            raise ValueError("WorkbenchKubeSpawner needs policy_path (the platform YAML) or a policy")
        return cached_policy(self.policy_path)

    @default("profile_list")
    def _default_profile_list(self):
        return make_profile_list(self.policy)

    @property
    def user_groups(self) -> list[str]:
        return [g.name for g in self.user.groups]

    async def _start(self):
        # the checks of load_user_options (403 / fallback of stored options), before the admission that charges
        self.profile_name = self.start_profile()
        if self.quota is None:
            return await super()._start()
        await self._admit()  # before the PVC, the pod or any other object is made
        self._quota_starting = True
        try:
            return await super()._start()
        except BaseException:
            await self._record_stop()
            raise
        finally:
            self._quota_starting = False

    async def stop(self, now=False):
        try:
            return await super().stop(now=now)
        finally:
            if not self._quota_starting:
                await self._record_stop()
            if self._owns_dask_clusters():  # the user's clusters end with their default server
                await self._stop_dask_clusters()

    async def start(self):
        try:
            started = await super().start()
        except BaseException:
            self.forget_refused_options()
            raise
        self.remember_admitted_options()
        return started

    gpu_runtime_class = Unicode(
        "",
        help="""The RuntimeClass of GPU pods (e.g. ``nvidia`` where the NVIDIA container runtime is not the
        node's default); empty: the node's default. The chart sets it from ``gpu.runtimeClassName``.""",
    ).tag(config=True)

    gpu_dev_shm = Bool(
        False,
        help="""Give GPU pods a memory-backed ``/dev/shm`` as large as the profile's memory limit (NCCL and
        PyTorch data loaders fail with the container runtime's 64 MiB). The chart sets it from
        ``gpu.devShm.enabled``.""",
    ).tag(config=True)

    def get_env(self):
        env = super().get_env()  # MEM_LIMIT and CPU_LIMIT from the profile's limits
        profile = (self.user_options or {}).get("profile") or choose_profile(self.policy, self.user_groups, None)
        if profile in self.policy.profiles:
            info = server_info_env(self.policy, self.user_groups, profile, "kubernetes")
            env.update({k: v for k, v in info.items() if k not in env})
        # the node the pod runs on, for the cockpit (Kubernetes' downward API)
        env.setdefault("WORKBENCH_NODE", {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
        return env

    async def load_user_options(self):
        # raises web.HTTPError(403) naming the allowed profiles; stored options no longer entitled fall back
        # (a fallback drops "profile" from user_options, so KubeSpawner takes the first entitled one)
        profile = self.start_profile()
        await super().load_user_options()
        self._gpu_pod_options(profile)

    def _gpu_pod_options(self, profile: str) -> None:
        """The runtime class and a memory-backed ``/dev/shm`` of a GPU profile's pod (see the traits)."""
        prof = self.policy.profiles.get(profile)
        if prof is None or not prof.gpu:
            return
        if self.gpu_runtime_class:
            self.extra_pod_config = {**(self.extra_pod_config or {}), "runtimeClassName": self.gpu_runtime_class}
        if self.gpu_dev_shm:
            volume = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.mem_limit}}
            mount = {"name": "dshm", "mountPath": "/dev/shm"}
            if isinstance(self.volumes, dict):
                self.volumes = {**self.volumes, "dshm": volume}
            else:
                self.volumes = [*self.volumes, volume]
            if isinstance(self.volume_mounts, dict):
                self.volume_mounts = {**self.volume_mounts, "dshm": mount}
            else:
                self.volume_mounts = [*self.volume_mounts, mount]


# ---------------------------------------------------------------------------
# Offline rendering
# ---------------------------------------------------------------------------

_PLACEHOLDER_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: offline
  cluster: {server: "https://127.0.0.1:1"}
contexts:
- name: offline
  context: {cluster: offline, user: offline}
current-context: offline
users:
- name: offline
  user: {}
"""


@contextlib.contextmanager
def _offline_kube_config() -> Iterator[None]:
    """Let a KubeSpawner be built with no cluster: a placeholder kube config (nothing connects to it).

    KubeSpawner loads the kube config in its constructor (once per process, cached); this points
    ``KUBECONFIG`` (and the kubernetes client's default location, read from ``KUBECONFIG`` when it
    was imported) at a temporary placeholder for the duration, then restores both, the client's
    default configuration and the cache.
    """
    from kubernetes_asyncio.client import Configuration
    from kubernetes_asyncio.config import kube_config
    from kubespawner.clients import load_config

    saved_env = os.environ.get("KUBECONFIG")
    saved_location = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    saved_default = Configuration.get_default_copy()
    with tempfile.TemporaryDirectory(prefix="workbench-kube-") as tmp:
        path = os.path.join(tmp, "kubeconfig")
        with open(path, "w") as f:
            f.write(_PLACEHOLDER_KUBECONFIG)
        os.environ["KUBECONFIG"] = path
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path
        load_config.cache_clear()
        try:
            yield
        finally:
            if saved_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved_env
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
            load_config.cache_clear()
            Configuration.set_default(saved_default)


class _Named:
    def __init__(self, name: str):
        self.name = name


class _RenderUser:
    """The few attributes of a hub user that building a pod manifest reads."""

    def __init__(self, name: str, groups: Iterable[str]):
        self.name = name
        self.id = 0
        self.url = f"/user/{name}/"
        self.groups = [_Named(g) for g in groups]


class _RenderHub:
    public_host = ""
    url = "http://hub:8081/hub/"
    base_url = "/hub/"
    api_url = "http://hub:8081/hub/api"


async def render_pod_async(
    policy: Policy, username: str, user_groups: Iterable[str], profile: str | None, config: dict | None = None
) -> dict:
    """The pod manifest KubeSpawner would create for ``username`` with ``profile`` (None: default).

    Builds a real :class:`WorkbenchKubeSpawner` with :func:`kubespawner_settings` (and ``config``, more of its
    traits, as the hub sets them), runs its ``load_user_options`` (the policy check, then the profile's
    overrides) and ``get_pod_manifest``; no API call is made. Raises ``tornado.web.HTTPError(403)`` when the
    user's groups may not use ``profile``. Notebook jobs build their pods with it (:mod:`workbench.jobs.kube`).
    """
    from kubernetes_asyncio.client import ApiClient
    from traitlets.config import Config

    config = Config({"WorkbenchKubeSpawner": {**kubespawner_settings(policy), **(config or {})}})
    with _offline_kube_config():
        spawner = WorkbenchKubeSpawner(
            policy=policy,
            user=_RenderUser(username, user_groups),
            hub=_RenderHub(),
            config=config,
        )
        spawner.user_options = {"profile": profile} if profile else {}
        await spawner.load_user_options()
        pod = await spawner.get_pod_manifest()
        async with ApiClient() as client:
            return client.sanitize_for_serialization(pod)


def render_pod(policy: Policy, username: str, user_groups: Iterable[str], profile: str | None) -> dict:
    """Synchronous :func:`render_pod_async` (not from inside a running event loop)."""
    return asyncio.run(render_pod_async(policy, username, list(user_groups), profile))
