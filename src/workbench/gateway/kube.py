"""Dask Gateway on Kubernetes: dask-gateway's own Kubernetes backend, configured from the policy.

The gateway's ``KubeBackend`` turns a user's validated cluster options into a ``DaskCluster``
object (its ``spec.config`` is the cluster's ``KubeClusterConfig`` as a dict); dask-gateway's
``KubeController`` turns that object into the scheduler and worker pods. This module only supplies
configuration, as pure functions of the policy:

- :func:`kube_overrides` — the per-user part of a ``KubeClusterConfig`` (image, accounting labels,
  non-root security context, no API token, and for GPU workers the GPU resource, node selector and
  tolerations of the group's GPU type). It is the ``backend_overrides`` of
  :func:`workbench.gateway.local.cluster_options_for`, which validates the options against the group's
  Dask limits first.
- :func:`kube_cluster_options` — the ``c.Backend.cluster_options`` callable using it.
- :func:`kube_gateway_settings` — ``{section: {trait: value}}`` common to every cluster, in the
  shape of :func:`workbench.embedded.hub.hub_settings` (apply with :func:`workbench.embedded.hub.apply_settings`).

:func:`render_cluster_pods` proves the result offline: it runs the real backend's option
processing and ``make_cluster_object``, then the real controller's pod-creating methods against a
recording stand-in for the Kubernetes API, and returns the pods the controller would submit.

How a Kubernetes gateway config uses this module::

    from workbench.gateway.kube import kube_gateway_settings
    from workbench.settings import apply_settings
    from workbench.policy import load_policy

    policy = load_policy("/etc/workbench/platform.yaml")
    apply_settings(c, kube_gateway_settings(policy, namespace="workbench"))

Per-user settings replace, not extend, the common ones: traitlets gives the keyword arguments a
``KubeClusterConfig`` is built with precedence over its config, and a dict-valued trait is
replaced whole. So :func:`kube_overrides` always returns the complete ``*_extra_pod_config`` /
``*_extra_container_config`` (security context included), never just the GPU parts.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.backends.kubernetes.backend import KubeClusterConfig
from traitlets import Integer

from workbench.gateway.kube_backend import WorkbenchKubeBackend
from workbench.gateway.options import cluster_options_for
from workbench.policy import DaskPolicy, Policy

__all__ = [
    "ClusterOptionsError",
    "GROUP_LABEL",
    "USERNAME_LABEL",
    "WorkbenchKubeBackend",
    "WorkbenchKubeClusterConfig",
    "cluster_image",
    "kube_cluster_options",
    "kube_gateway_settings",
    "kube_overrides",
    "render_cluster_pods",
    "render_cluster_pods_async",
    "security_contexts",
]

#: the label KubeSpawner puts on notebook pods (value: the user name as a safe label value)
USERNAME_LABEL = "hub.jupyter.org/username"
#: the Dask group whose limits a cluster runs under
GROUP_LABEL = "workbench/group"


class ClusterOptionsError(ValueError):
    """Cluster options a user may not have (beyond their group's limits, unknown, or no Dask access)."""


# ---------------------------------------------------------------------------
# Pure builders
# ---------------------------------------------------------------------------


def security_contexts(policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(pod securityContext, container securityContext)`` of Dask pods (pure).

    The same as notebook pods (:func:`workbench.spawn.kube.kubespawner_settings`: uid 1000, gid 1000,
    fsGroup 100, non-root, no privilege escalation, all capabilities dropped, RuntimeDefault
    seccomp), laid out as KubeSpawner lays them out.
    """
    from workbench.spawn.kube import kubespawner_settings  # imports KubeSpawner: only when building configs

    s = kubespawner_settings(policy)
    pod = {"fsGroup": s["fs_gid"], **copy.deepcopy(s["pod_security_context"])}
    container = {
        "runAsUser": s["uid"],
        "runAsGroup": s["gid"],
        **copy.deepcopy(s["container_security_context"]),
        "allowPrivilegeEscalation": s["allow_privilege_escalation"],
    }
    return pod, container


def _profile_image(policy: Policy, profile: str) -> str:
    return policy.images[policy.profiles[profile].image].image


def _default_image(policy: Policy) -> str | None:
    """The image of clusters of a group with no profiles: ``base`` if defined, else the first image."""
    if "base" in policy.images:
        return policy.images["base"].image
    return next((i.image for i in policy.images.values()), None)


def cluster_image(policy: Policy, group: str, gpu: bool = False) -> str | None:
    """The image of a group's Dask pods (pure); the user cannot choose it.

    The notebook image of the group's first profile, so that the client (the user's notebook) and
    the cluster run the same packages. With ``gpu`` (the workers of a cluster with
    ``worker_gpus`` > 0): the image of the group's first profile with a GPU of the group's
    ``dask.gpu_type`` (else with any GPU), since a CPU image cannot use the GPU; the first
    profile's image when the group has no GPU profile. None: the policy has no images at all.
    """
    profiles = [p for p in policy.groups[group].profiles if p in policy.profiles]
    if gpu and profiles:
        dask = policy.groups[group].dask
        gpu_profiles = [p for p in profiles if policy.profiles[p].gpu]
        matching = [p for p in gpu_profiles if dask and policy.profiles[p].gpu.type == dask.gpu_type]
        chosen = (matching or gpu_profiles or profiles)[0]
        return _profile_image(policy, chosen)
    if profiles:
        return _profile_image(policy, profiles[0])
    return _default_image(policy)


def _username_label(username: str) -> str:
    from kubespawner.slugs import is_valid_label, safe_slug

    return safe_slug(username, is_valid=is_valid_label)


@dataclass(frozen=True)
class GpuPods:
    """How GPU pods run on this cluster (the chart's ``gpu.runtimeClassName`` and ``gpu.devShm.enabled``)."""

    runtime_class: str = ""  # the pods' RuntimeClass; empty: the node's default
    dev_shm: bool = False  # a memory-backed /dev/shm as large as the worker's memory (NCCL, data loaders)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GpuPods:
        return cls(
            runtime_class=(env.get("WORKBENCH_GPU_RUNTIME_CLASS") or "").strip(),
            dev_shm=(env.get("WORKBENCH_GPU_DEV_SHM") or "").strip().lower() in ("1", "true", "yes"),
        )


def kube_overrides(
    policy: Policy, username: str | None = None, gpu_pods: GpuPods = GpuPods()
) -> Callable[[str, DaskPolicy, Mapping], dict]:
    """``backend_overrides(group, dask, options) -> dict`` for the Kubernetes backend (pure).

    The returned callable gives the ``KubeClusterConfig`` traits of one user's cluster, merged by
    :func:`workbench.gateway.local.cluster_options_for` into the overrides it computed from the validated
    options:

    - ``max_clusters``: the group's ``dask.max_clusters`` (:class:`WorkbenchKubeBackend` enforces it);
    - ``image``: :func:`cluster_image` of the group (a GPU image for GPU workers, as the worker
      container's ``image``);
    - scheduler and worker pods: the non-root :func:`security_contexts`,
      ``automountServiceAccountToken: false``, the labels ``workbench/group: <group>`` and, with
      ``username``, ``hub.jupyter.org/username: <name>`` escaped like KubeSpawner does (plus the raw
      name as an annotation of the same key, as KubeSpawner does);
    - when ``options.worker_gpus`` > 0: the worker container's ``resources`` limits and requests
      of the GPU type's resource (e.g. ``nvidia.com/gpu`` or a MIG resource), and the worker pod's
      ``nodeSelector`` and ``tolerations`` of that GPU type, and ``gpu_pods``' runtime class and memory-backed
      ``/dev/shm`` (sized as the worker's memory). Schedulers never get GPUs.

    ``username`` is the gateway user's name. ``backend_overrides`` is not given the user, so bind it
    here: :func:`kube_cluster_options` does, per request.
    """
    pod_security, container_security = security_contexts(policy)

    def overrides(group: str, dask: DaskPolicy, options: Mapping) -> dict[str, Any]:
        labels = {GROUP_LABEL: group}
        annotations = {}
        if username is not None:
            labels[USERNAME_LABEL] = _username_label(username)
            annotations[USERNAME_LABEL] = username

        def pod_config() -> dict[str, Any]:
            return {"securityContext": copy.deepcopy(pod_security), "automountServiceAccountToken": False}

        worker_pod = pod_config()
        worker_container: dict[str, Any] = {"securityContext": copy.deepcopy(container_security)}
        gpus = options.get("worker_gpus", 0) or 0
        if gpus:
            if not dask.gpu_workers or dask.gpu_type not in policy.gpu_types:
                raise ValueError(f"worker_gpus: the Dask policy of group {group!r} has no GPU workers")
            gtype = policy.gpu_types[dask.gpu_type]
            worker_container["resources"] = {
                "limits": {gtype.resource: str(gpus)},
                "requests": {gtype.resource: str(gpus)},
            }
            gpu_image = cluster_image(policy, group, gpu=True)
            if gpu_image and gpu_image != cluster_image(policy, group):
                worker_container["image"] = gpu_image
            if gtype.node_selector:
                worker_pod["nodeSelector"] = dict(gtype.node_selector)
            if gtype.tolerations:
                worker_pod["tolerations"] = copy.deepcopy(gtype.tolerations)
            if gpu_pods.runtime_class:
                worker_pod["runtimeClassName"] = gpu_pods.runtime_class
            if gpu_pods.dev_shm:
                size = options.get("worker_memory")  # GiB, as the option is given
                shm = {"medium": "Memory", **({"sizeLimit": f"{int(float(size) * 1024)}Mi"} if size else {})}
                worker_pod["volumes"] = [{"name": "dshm", "emptyDir": shm}]
                worker_container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]

        out: dict[str, Any] = {
            "max_clusters": dask.max_clusters,
            "scheduler_extra_pod_config": pod_config(),
            "scheduler_extra_container_config": {"securityContext": copy.deepcopy(container_security)},
            "scheduler_extra_pod_labels": dict(labels),
            "scheduler_extra_pod_annotations": dict(annotations),
            "worker_extra_pod_config": worker_pod,
            "worker_extra_container_config": worker_container,
            "worker_extra_pod_labels": dict(labels),
            "worker_extra_pod_annotations": dict(annotations),
        }
        image = cluster_image(policy, group)
        if image:
            out["image"] = image
        return out

    return overrides


def kube_cluster_options(policy: Policy, gpu_pods: GpuPods = GpuPods()) -> Callable[[Any], Any]:
    """``c.Backend.cluster_options`` for Kubernetes: ``options(user)`` (pure).

    :func:`workbench.gateway.local.cluster_options_for` of the user's groups (their most generous Dask
    group's limits), with :func:`kube_overrides` bound to ``user.name``.
    """

    def options(user):
        return cluster_options_for(
            policy, list(user.groups), kube_overrides(policy, username=user.name, gpu_pods=gpu_pods)
        )

    return options


def kube_gateway_settings(
    policy: Policy, namespace: str = "workbench", gpu_pods: GpuPods = GpuPods(), image_pull_secrets: list[str] = ()
) -> dict[str, dict[str, Any]]:
    """``{section: {trait: value}}`` of the gateway's Kubernetes backend, common to all clusters (pure).

    - ``DaskGateway.backend_class``: :class:`WorkbenchKubeBackend` (dask-gateway's ``KubeBackend``
      plus the group's ``dask.max_clusters`` per user);
    - ``Backend.cluster_options``: :func:`kube_cluster_options` of the policy;
    - ``KubeClusterConfig``: the namespace, ``dask scheduler`` / ``dask worker`` (from the image's
      PATH), no extra environment, the default idle timeout of a Dask policy, the default image and
      the locked-down pod settings. Every cluster made through ``cluster_options`` overrides the
      per-user traits anyway (:func:`kube_overrides`); these are what a cluster would get if it
      were not.

    The gateway instance (``KubeBackend.gateway_instance``, from ``DASK_GATEWAY_INSTANCE``) and the
    ``api_url`` the clusters call back to depend on the deployment (the Helm chart's names) and
    are not set here.
    """
    pod_security, container_security = security_contexts(policy)
    pod = {"securityContext": pod_security, "automountServiceAccountToken": False}
    container = {"securityContext": container_security}
    cluster: dict[str, Any] = {
        "namespace": namespace,
        "scheduler_cmd": ["dask", "scheduler"],
        "worker_cmd": ["dask", "worker"],
        "environment": {},
        "idle_timeout": float(DaskPolicy().idle_timeout),
        "image_pull_policy": "IfNotPresent",
        "scheduler_extra_pod_config": copy.deepcopy(pod),
        "worker_extra_pod_config": copy.deepcopy(pod),
        "scheduler_extra_container_config": copy.deepcopy(container),
        "worker_extra_container_config": copy.deepcopy(container),
    }
    image = _default_image(policy)
    if image:
        cluster["image"] = image
    if image_pull_secrets:  # from a private registry (the chart's imagePullSecrets)
        cluster["image_pull_secrets"] = [{"name": name} for name in image_pull_secrets]
    return {
        "DaskGateway": {"backend_class": f"{__name__}.{WorkbenchKubeBackend.__name__}"},
        "Backend": {"cluster_options": kube_cluster_options(policy, gpu_pods)},
        "KubeClusterConfig": cluster,
    }


# ---------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------


class WorkbenchKubeClusterConfig(KubeClusterConfig):
    """``KubeClusterConfig`` that also carries the group's ``dask.max_clusters``.

    Without this trait, the ``max_clusters`` override of :func:`workbench.gateway.local.cluster_config_for`
    would be dropped by traitlets (with a DeprecationWarning) and the cap silently lost.
    """

    max_clusters = Integer(
        0,
        help="How many active clusters the requesting user may have (from the group's dask.max_clusters). "
        "0 (the default, for a cluster config not made by the policy's cluster options): none.",
    ).tag(config=True)


# ---------------------------------------------------------------------------
# Offline rendering through dask-gateway's own code
# ---------------------------------------------------------------------------


class _RecordingCoreClient:
    """Stands in for the Kubernetes API: records the pods the controller submits."""

    def __init__(self):
        self.pods: list[dict] = []

    async def create_namespaced_pod(self, namespace, pod):
        submitted = copy.deepcopy(pod)
        submitted["metadata"]["namespace"] = namespace
        self.pods.append(submitted)
        created = copy.deepcopy(submitted)
        name = created["metadata"].get("name") or created["metadata"]["generateName"] + "00000"
        created["metadata"].update(name=name, uid=f"00000000-0000-0000-0000-{len(self.pods):012d}")
        return created if "name" in pod["metadata"] else SimpleNamespace(metadata=SimpleNamespace(name=name))


class _IdentityApiClient:
    @staticmethod
    def sanitize_for_serialization(obj):
        return obj


async def render_cluster_pods_async(
    policy: Policy,
    username: str,
    user_groups: Iterable[str],
    options: Mapping[str, Any] | None = None,
    *,
    namespace: str = "workbench",
    cluster_name: str = "0" * 32,
    gateway_instance: str = "workbench",
    api_url: str = "http://api-dask-gateway.workbench:8000/api",
) -> dict[str, dict]:
    """The scheduler pod and a worker pod dask-gateway would create for ``username``'s cluster.

    Runs upstream's code end to end, with no cluster: a :class:`WorkbenchKubeBackend` configured
    with :func:`kube_gateway_settings` processes ``options`` (validation against the user's group,
    :func:`kube_overrides`) into a ``KubeClusterConfig`` and makes the ``DaskCluster`` object; the
    object goes through JSON (as through the API server); then a ``KubeController`` runs its own
    ``create_scheduler_pod_if_not_exists`` and ``handle_scale_up`` against a recording stand-in for
    the Kubernetes API. The pods are returned as submitted, with ``metadata.namespace`` set.
    ``cluster_name`` replaces upstream's random name so that the output is reproducible.

    Raises :class:`ClusterOptionsError` naming the option when ``options`` exceed the limits of the
    user's group, name an unknown option, or the user's groups have no Dask access.
    """
    from dask_gateway_server.backends.kubernetes.controller import ClusterInfo, KubeController
    from dask_gateway_server.models import User
    from traitlets.config import Config

    user_groups = list(user_groups)
    config = Config()
    for section, values in kube_gateway_settings(policy, namespace).items():
        for key, value in values.items():
            setattr(config[section], key, value)
    quiet = logging.getLogger("workbench.render-cluster")  # the controller logs each pod it "creates"
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    backend = WorkbenchKubeBackend(config=config, gateway_instance=gateway_instance, api_url=api_url, log=quiet)
    user = User(username, groups=user_groups)
    try:
        requested, cluster_config = await backend.process_cluster_options(user, dict(options or {}))
    except PublicException as e:
        group = policy.dask_group_for(user_groups)
        allowed = ""
        if group is not None:
            fields = [f.field for f in cluster_options_for(policy, user_groups).fields]
            allowed = f"; the options of group {group!r} are: {', '.join(fields)}"
        raise ClusterOptionsError(f"Dask cluster options refused for user {username!r}: {e}{allowed}") from None

    cluster = json.loads(json.dumps(backend.make_cluster_object(username, requested, cluster_config)))
    cluster["metadata"]["name"] = cluster_name
    cluster["metadata"]["labels"]["gateway.dask.org/cluster"] = cluster_name
    cluster["metadata"].update(namespace=cluster_config.namespace, uid="00000000-0000-0000-0000-000000000000")

    controller = KubeController(config=config, gateway_instance=gateway_instance, api_url=api_url, log=quiet)
    controller.core_client = _RecordingCoreClient()
    controller.api_client = _IdentityApiClient()
    _, scheduler = await controller.create_scheduler_pod_if_not_exists(cluster)
    await controller.handle_scale_up(cluster, scheduler, ClusterInfo(), replicas=1, delta=1)
    scheduler_pod, worker_pod = controller.core_client.pods
    return {"scheduler": scheduler_pod, "worker": worker_pod}


def render_cluster_pods(
    policy: Policy,
    username: str,
    user_groups: Iterable[str],
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, dict]:
    """Synchronous :func:`render_cluster_pods_async` (not from inside a running event loop)."""
    return asyncio.run(render_cluster_pods_async(policy, username, list(user_groups), options, **kwargs))


# ---------------------------------------------------------------------------
# Command line: workbench render-cluster
# ---------------------------------------------------------------------------
