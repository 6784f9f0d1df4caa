"""Dask Gateway on Kubernetes: the API server's and the controller's settings, watching one namespace.

dask-gateway's backend and controller watch their objects in *all* namespaces, which needs ClusterRoles.
:class:`NamespacedKubeBackend` and :class:`NamespacedKubeController` turn those cluster-wide list/watch calls
into calls in ``watch_namespace`` (the release's namespace), so the chart grants namespaced Roles only.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

from dask_gateway_server.backends.kubernetes.controller import KubeController
from traitlets import Unicode

from workbench.gateway.kube import GpuPods, WorkbenchKubeBackend, kube_gateway_settings
from workbench.kubernetes.hub import (
    DEFAULT_PLATFORM,
    GATEWAY_ENV,
    GATEWAY_PREFIX,
    K8sConfigError,
    _load,
    _require,
    dashboard_middleware_name,
    pull_secret_names,
    quota_api_url,
)
from workbench.names import GATEWAY_SERVICE
from workbench.policy import Policy, PolicyError
from workbench.settings import apply_settings


def k8s_gateway_settings(policy: Policy, env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Settings of the gateway API server *and* its controller on Kubernetes (pure).

    :func:`workbench.gateway.kube.kube_gateway_settings` (per-group cluster options, locked-down pods)
    with :class:`NamespacedKubeBackend`, JupyterHub authentication (callers need
    ``access:services!service=dask-gateway``), and the controller's Traefik routes under
    :data:`GATEWAY_PREFIX`. Both watch only ``WORKBENCH_NAMESPACE``. With ``WORKBENCH_QUOTA_URL`` the backend
    admits and accounts schedulers and workers with the quota service (:mod:`workbench.gateway.kube_backend`).
    """
    _require(env, GATEWAY_ENV, "dask-gateway")
    namespace = env["WORKBENCH_NAMESPACE"]
    instance = env["WORKBENCH_GATEWAY_INSTANCE"]
    api_url = env["WORKBENCH_GATEWAY_API_URL"]
    settings = kube_gateway_settings(
        policy, namespace, gpu_pods=GpuPods.from_env(env), image_pull_secrets=pull_secret_names(env)
    )
    settings["DaskGateway"] = {
        **settings["DaskGateway"],
        "backend_class": f"{NamespacedKubeBackend.__module__}.{NamespacedKubeBackend.__name__}",
        "address": ":8000",
        "log_level": "INFO",
        "authenticator_class": "dask_gateway_server.auth.JupyterHubAuthenticator",
    }
    settings["JupyterHubAuthenticator"] = {
        "jupyterhub_api_url": env["WORKBENCH_HUB_API_URL"],
        "jupyterhub_service_name": GATEWAY_SERVICE,
        "use_service_access_scopes": True,
    }
    settings["KubeBackend"] = {"gateway_instance": instance, "api_url": api_url}
    settings["NamespacedKubeBackend"] = {"watch_namespace": namespace}
    settings["WorkbenchKubeBackend"] = {"policy_path": env.get("WORKBENCH_PLATFORM") or DEFAULT_PLATFORM}
    quota_url = (env.get("WORKBENCH_QUOTA_URL") or "").strip()
    if quota_url:  # schedulers and workers admitted and accounted (workbench.gateway.quota), as on the other engines
        settings["WorkbenchKubeBackend"].update(
            quota_api_url=quota_api_url(quota_url),
            # the dask-gateway service's token (the API pod's JUPYTERHUB_API_TOKEN): a quota writer by role;
            # the controller has none and needs none (the backend checks it at start-up)
            quota_api_token=env.get("JUPYTERHUB_API_TOKEN", ""),
        )
    settings["KubeController"] = {
        "address": ":8000",
        "gateway_instance": instance,
        "api_url": api_url,
        "proxy_prefix": GATEWAY_PREFIX,
        "proxy_web_entrypoint": "web",
        "proxy_tcp_entrypoint": "tcp",
        "proxy_web_middlewares": [{"name": dashboard_middleware_name(instance), "namespace": namespace}],
    }
    settings["NamespacedKubeController"] = {"watch_namespace": namespace}
    return settings


#: cluster-wide list calls of dask-gateway's informers -> their namespaced counterparts
_NAMESPACED = {
    "list_pod_for_all_namespaces": "list_namespaced_pod",
    "list_endpoints_for_all_namespaces": "list_namespaced_endpoints",
}


class NamespacedClient:
    """A Kubernetes API client whose cluster-wide list (and watch) calls stay in one namespace.

    Wraps ``CoreV1Api`` / ``CustomObjectsApi`` (or dask-gateway's rate-limited wrapper of them):
    ``list_pod_for_all_namespaces`` becomes ``list_namespaced_pod(namespace)``,
    ``list_endpoints_for_all_namespaces`` becomes ``list_namespaced_endpoints(namespace)`` and
    ``list_cluster_custom_object(group, version, plural)`` becomes
    ``list_namespaced_custom_object(group, version, namespace, plural)``; the keyword arguments
    (label selector, ``watch``, ``resource_version``) pass through. Everything else is the wrapped
    client's.
    """

    def __init__(self, client: Any, namespace: str):
        self._client = client
        self._namespace = namespace

    @property
    def api_client(self):
        return self._client.api_client

    def list_cluster_custom_object(self, group, version, plural, **kwargs):
        return self._client.list_namespaced_custom_object(group, version, self._namespace, plural, **kwargs)

    def __getattr__(self, name: str):
        if name in _NAMESPACED:
            return functools.partial(getattr(self._client, _NAMESPACED[name]), self._namespace)
        return getattr(self._client, name)


def _namespaced_client(attr: str) -> property:
    """A property that wraps the client assigned to ``attr`` in a :class:`NamespacedClient`."""
    slot = f"_workbench_{attr}"

    def get(self):
        try:
            return self.__dict__[slot]
        except KeyError:
            raise AttributeError(attr) from None

    def set_(self, client):
        self.__dict__[slot] = NamespacedClient(client, self.watch_namespace) if self.watch_namespace else client

    return property(get, set_, doc=f"``{attr}``, watching only ``watch_namespace`` when it is set")


_WATCH_NAMESPACE_HELP = """Watch dask-gateway's objects (DaskClusters, pods, endpoints) in this namespace only,
so that namespaced Roles suffice. Empty: all namespaces (upstream's behaviour, needs ClusterRoles). Clusters
must be created in this namespace (KubeClusterConfig.namespace)."""


class NamespacedKubeBackend(WorkbenchKubeBackend):
    """:class:`workbench.gateway.kube.WorkbenchKubeBackend` watching one namespace (``watch_namespace``)."""

    watch_namespace = Unicode("", help=_WATCH_NAMESPACE_HELP).tag(config=True)
    core_client = _namespaced_client("core_client")
    custom_client = _namespaced_client("custom_client")


class NamespacedKubeController(KubeController):
    """dask-gateway's ``KubeController`` watching one namespace (``watch_namespace``)."""

    watch_namespace = Unicode("", help=_WATCH_NAMESPACE_HELP).tag(config=True)
    core_client = _namespaced_client("core_client")
    custom_client = _namespaced_client("custom_client")


def configure_k8s_gateway(c, environ: Mapping[str, str] | None = None) -> None:
    """Configure the gateway API server or controller pod: apply :func:`k8s_gateway_settings`."""
    import os

    environ = os.environ if environ is None else environ
    try:
        settings = k8s_gateway_settings(_load(environ), environ)
    except (PolicyError, K8sConfigError) as e:
        print(f"workbench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    apply_settings(c, settings)
