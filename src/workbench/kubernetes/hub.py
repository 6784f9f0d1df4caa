"""The workbench on Kubernetes: hub, Dask Gateway and controller settings from (policy, environment).

The Helm chart (``charts/workbench``) runs three processes from the hub image, each configured by a
thin loader in ``hub_config/`` that calls one function of this module:

=====================  ==========================================================================
hub                    ``jupyterhub -f hub_config/jupyterhub_config_k8s.py`` → :func:`configure_k8s_hub`
gateway API server     ``dask-gateway-server -f hub_config/dask_gateway_config_k8s.py`` →
                       :func:`workbench.kubernetes.gateway.configure_k8s_gateway`
gateway controller     ``python -m workbench.kubernetes kube-controller -f hub_config/dask_gateway_config_k8s.py``
                       (:class:`NamespacedKubeController`, same loader)
dashboard guard        ``python -m workbench.kubernetes dashguard`` → :func:`workbench.kubernetes.guard.serve_k8s_guard`
                       (:mod:`workbench.gateway.dashguard` in front of the gateway's Traefik proxy)
=====================  ==========================================================================

The quota service runs in its own pod too (``python -m workbench.services.quota``, configured by its command
line); the hub registers it as an external service when the chart sets ``WORKBENCH_QUOTA_URL``. So does
the sessions service (``python -m workbench.services.sessions.app``: session limits, per-profile idle culling and
notifications), registered when the chart sets ``WORKBENCH_SESSIONS_URL``; it then replaces the stock
jupyterhub-idle-culler, which the hub runs in its own pod only when there is no sessions service.

The platform YAML is mounted from a ConfigMap (``WORKBENCH_PLATFORM``, default
``/etc/workbench/platform.yaml``); everything that depends on the deployment (namespace, release,
service URLs, database) reaches the processes as environment variables set by the chart, listed
in :data:`HUB_ENV`, :data:`GATEWAY_ENV` and :data:`GUARD_ENV`. Secrets arrive as environment variables too
(``JPY_COOKIE_SECRET``, ``CONFIGPROXY_AUTH_TOKEN``, ``JUPYTERHUB_CRYPT_KEY``, the service tokens, the
OAuth client secret named by ``auth.client_secret_env``) and only the service tokens, which
JupyterHub needs in its ``services`` list, are copied into the settings.

:func:`k8s_hub_settings` and :func:`k8s_gateway_settings` are pure: ``(policy, env) -> {section:
{trait: value}}`` in the shape of :func:`workbench.embedded.hub.hub_settings`, applied with
:func:`workbench.embedded.hub.apply_settings`. They build on :func:`workbench.spawn.kube.kube_hub_settings`
(KubeSpawner, profiles, storage, locked-down pods), :func:`workbench.auth.oauth.auth_settings` (login)
and :func:`workbench.gateway.kube.kube_gateway_settings` (clusters per group).

Least privilege: dask-gateway's backend and controller watch their objects in *all* namespaces,
which needs ClusterRoles. :class:`NamespacedKubeBackend` and :class:`NamespacedKubeController`
turn those cluster-wide list/watch calls into calls in ``watch_namespace`` (the release's
namespace), so the chart grants namespaced Roles only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from workbench.auth.demo import DemoAuthExposed
from workbench.auth.oauth import auth_settings
from workbench.jobs.wiring import jobs_roles_for
from workbench.names import (
    CULLER_SCOPES,
    CULLER_SERVICE,
    GATEWAY_SERVICE,
    JOBS_ACCESS_SCOPE,
    JOBS_SERVICE,
    QUOTA_ACCESS_SCOPE,
    QUOTA_CUSTOM_SCOPES,
    QUOTA_SERVICE,
    ROSTERS_ACCESS_SCOPE,
    ROSTERS_SERVICE,
    SERVER_TOKEN_SCOPES,
    SESSIONS_ACCESS_SCOPE,
    SESSIONS_SERVICE,
)
from workbench.origins import SubdomainHostError, check_subdomain_host, subdomain_settings
from workbench.policy import Policy, PolicyError, load_policy
from workbench.services.quota.wiring import quota_roles
from workbench.services.sessions.rules import needs_service as needs_sessions_service
from workbench.settings import apply_settings, roles
from workbench.spawn.kube import kube_hub_settings
from workbench.spawnpage import TEMPLATES as SPAWN_TEMPLATES
from workbench.spawnpage import template_vars as spawn_template_vars

__all__ = [
    "DEFAULT_PLATFORM",
    "GATEWAY_ENV",
    "GATEWAY_PREFIX",
    "GUARD_ENV",
    "GUARD_PORT",
    "HUB_ENV",
    "HUB_PORT",
    "SINGLEUSER_COMPONENT",
    "K8sConfigError",
    "configure_k8s_hub",
    "dashboard_middleware_name",
    "k8s_hub_settings",
    "singleuser_labels",
]

log = logging.getLogger("workbench.kubernetes.hub")

DEFAULT_PLATFORM = "/etc/workbench/platform.yaml"
#: the hub's API port (the chart's hub Service)
HUB_PORT = 8081
#: the dashboard guard's port (the chart's gateway-guard Service)
GUARD_PORT = 8000
#: where the gateway is reached through the hub's proxy, and the prefix of its routes in Traefik
GATEWAY_PREFIX = f"/services/{GATEWAY_SERVICE}"

#: environment of the hub pod: name -> what the chart puts there (``*``: required)
HUB_ENV: dict[str, str] = {
    "WORKBENCH_PLATFORM": f"path of the platform YAML (default {DEFAULT_PLATFORM})",
    "WORKBENCH_NAMESPACE": "* namespace of the release: notebook pods and their volumes go there",
    "WORKBENCH_RELEASE": "* Helm release name: the app.kubernetes.io/instance label of notebook pods",
    "WORKBENCH_PUBLIC_URL": "public URL of the workbench (https://workbench.example.edu); required for OAuth",
    "WORKBENCH_SUBDOMAIN_HOST": "hub.subdomainHost: each user's server on <user>.<host> (JupyterHub's subdomain_host)",
    "WORKBENCH_HUB_CONNECT_URL": "* URL at which pods reach the hub API (http://<release>-hub:8081)",
    "WORKBENCH_PROXY_API_URL": "* configurable-http-proxy's API (http://<release>-proxy-api:8001)",
    "WORKBENCH_DB_URL": "* hub database (sqlite:////srv/jupyterhub/jupyterhub.sqlite or a PostgreSQL URL)",
    "WORKBENCH_GATEWAY_URL": "* the dashboard guard in front of the gateway's HTTP proxy: the hub service dask-gateway",
    "WORKBENCH_GATEWAY_PROXY_ADDRESS": "* gateway://<host>:<port> of the gateway's TCP entrypoint (schedulers)",
    "WORKBENCH_GATEWAY_API_TOKEN": "* API token of the hub service dask-gateway (from the chart's Secret)",
    "WORKBENCH_CULLER_API_TOKEN": "API token of the idle culler (required when culling is enabled and "
    "WORKBENCH_SESSIONS_URL is not set)",
    "WORKBENCH_QUOTA_URL": "the quota service (http://<release>-quota:8013): the hub service quota; unset: none",
    "WORKBENCH_QUOTA_API_TOKEN": "API token of the hub service quota (required with WORKBENCH_QUOTA_URL)",
    "WORKBENCH_SESSIONS_URL": "the sessions service (http://<release>-sessions:8014): the hub service sessions, "
    "in place of the idle culler; unset: the idle culler (when culling is enabled)",
    "WORKBENCH_SESSIONS_API_TOKEN": "API token of the hub service sessions (required with WORKBENCH_SESSIONS_URL)",
    "WORKBENCH_SERVICES_URL": "where notebook pods reach the hub services for their notifications (the proxy's "
    "in-cluster Service + /services/); unset: <WORKBENCH_QUOTA_URL>/services/",
    "WORKBENCH_ROSTERS_URL": "the rosters service (http://<release>-rosters:8015): the hub service rosters, which "
    "loads course rosters for instructors; unset: none",
    "WORKBENCH_ROSTERS_API_TOKEN": "API token of the hub service rosters (required with WORKBENCH_ROSTERS_URL)",
    "WORKBENCH_JOBS_URL": "the notebook jobs service (http://<release>-jobs:8016): the hub service jobs, which runs "
    "notebooks as Kubernetes Jobs (workbench.jobs.kube); unset: none",
    "WORKBENCH_JOBS_API_TOKEN": "API token of the hub service jobs (required with WORKBENCH_JOBS_URL)",
    "WORKBENCH_GPU_RUNTIME_CLASS": "RuntimeClass of GPU notebook pods (gpu.runtimeClassName); unset: the node's default",
    "WORKBENCH_GPU_DEV_SHM": "'true': GPU notebook pods get a memory-backed /dev/shm of their memory limit",
    "WORKBENCH_ALLOW_DEMO_AUTH": "'true' to accept auth.type demo (the chart sets it only when not exposed)",
    "WORKBENCH_IMAGE_PULL_SECRETS": "comma-separated Secret names for pulling notebook images",
}
#: environment of the gateway API server and controller pods
GATEWAY_ENV: dict[str, str] = {
    "WORKBENCH_PLATFORM": f"path of the platform YAML (default {DEFAULT_PLATFORM})",
    "WORKBENCH_NAMESPACE": "* namespace of the release: Dask clusters go there, and only there is watched",
    "WORKBENCH_GATEWAY_INSTANCE": "* dask-gateway instance (the gateway.dask.org/instance label of its objects)",
    "WORKBENCH_GATEWAY_API_URL": "* URL at which schedulers reach the gateway API (http://<api>.<ns>:8000/api)",
    "WORKBENCH_HUB_API_URL": "* the hub API (http://<release>-hub:8081/hub/api), to check users' tokens",
    "WORKBENCH_IMAGE_PULL_SECRETS": "comma-separated Secret names for pulling the Dask pods' images",
    "WORKBENCH_GPU_RUNTIME_CLASS": "RuntimeClass of GPU worker pods (gpu.runtimeClassName); unset: the node's default",
    "WORKBENCH_GPU_DEV_SHM": "'true': GPU worker pods get a memory-backed /dev/shm of the worker's memory",
    "WORKBENCH_QUOTA_URL": "the quota service (http://<release>-quota:8013): the API server admits schedulers and "
    "workers with it and accounts them, with its JUPYTERHUB_API_TOKEN (the dask-gateway service's); unset: none",
}
#: environment of the dashboard guard pod (:mod:`workbench.gateway.dashguard`, the hub service dask-gateway)
GUARD_ENV: dict[str, str] = {
    "WORKBENCH_HUB_API_URL": "* the hub API (http://<release>-hub:8081/hub/api), to check users' tokens",
    "WORKBENCH_GATEWAY_PROXY_URL": "* the gateway's HTTP proxy (Traefik web entrypoint) the guard forwards to",
    "WORKBENCH_GATEWAY_API_TOKEN": "* API token of the hub service dask-gateway (from the chart's Secret)",
    "WORKBENCH_GUARD_COOKIE_SECRET": "* 64 hex characters: the key of the guard's login cookie (from the chart's Secret)",
    "WORKBENCH_GUARD_PORT": f"port to listen on, all addresses (default {GUARD_PORT})",
}


class K8sConfigError(ValueError):
    """The environment of a workbench pod is incomplete or inconsistent (a chart or manifest bug)."""


def _require(env: Mapping[str, str], names: Mapping[str, str], where: str) -> None:
    missing = [n for n, what in names.items() if what.startswith("*") and not env.get(n)]
    if missing:
        lines = [f"  - {n}: {names[n].lstrip('* ')}" for n in missing]
        raise K8sConfigError(f"{where}: missing environment variable(s) set by the Helm chart:\n" + "\n".join(lines))


def pull_secret_names(env: Mapping[str, str]) -> list[str]:
    """``WORKBENCH_IMAGE_PULL_SECRETS`` (comma-separated Secret names) as a list (pure)."""
    return [s.strip() for s in env.get("WORKBENCH_IMAGE_PULL_SECRETS", "").split(",") if s.strip()]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


#: KubeSpawner's ``component_label`` (its default): the app.kubernetes.io/component of notebook pods
SINGLEUSER_COMPONENT = "singleuser-server"


def singleuser_labels(release: str) -> dict[str, str]:
    """Labels of every notebook pod of ``release``: what the chart's NetworkPolicies select (pure).

    KubeSpawner sets ``app.kubernetes.io/component`` from its ``component_label`` and lets its
    ``common_labels`` (``app.kubernetes.io/name: jupyterhub``, ...) win over ``extra_labels``; the
    release comes from ``extra_labels`` (:func:`k8s_hub_settings`).
    """
    return {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": SINGLEUSER_COMPONENT}


def dashboard_middleware_name(gateway_instance: str) -> str:
    """The Traefik Middleware (made by the chart) that strips ``<prefix>/clusters/<name>`` for dashboards."""
    return f"{gateway_instance}-clusters-prefix"


@dataclass(frozen=True)
class _AuthRuntime:
    """The two things :func:`workbench.auth.oauth.auth_settings` reads from a runtime."""

    config: str
    public_url: str


def _max_workers_env(policy: Policy):
    """``WORKBENCH_DASK_MAX_WORKERS`` of a notebook pod: a KubeSpawner callable env value (as in the embedded mode)."""

    def value(spawner) -> str:
        dask = policy.dask_policy_for([g.name for g in spawner.user.groups])
        return str(dask.max_workers) if dask is not None else "0"

    return value


def _quota_url(env: Mapping[str, str]) -> str:
    """The quota service's URL, when the chart runs it (``WORKBENCH_QUOTA_URL``), else ''."""
    url = (env.get("WORKBENCH_QUOTA_URL") or "").strip()
    if url and not env.get("WORKBENCH_QUOTA_API_TOKEN"):
        raise K8sConfigError(
            "hub: WORKBENCH_QUOTA_URL is set but WORKBENCH_QUOTA_API_TOKEN (the quota service's token) is not"
        )
    return url


def quota_api_url(service_url: str) -> str:
    """The quota service's REST API under its URL (it serves under its hub prefix, ``/services/quota/``)."""
    return f"{service_url.rstrip('/')}/services/{QUOTA_SERVICE}/api"


def _sessions_url(env: Mapping[str, str]) -> str:
    """The sessions service's URL, when the chart runs it (``WORKBENCH_SESSIONS_URL``), else ''."""
    url = (env.get("WORKBENCH_SESSIONS_URL") or "").strip()
    if url and not env.get("WORKBENCH_SESSIONS_API_TOKEN"):
        raise K8sConfigError(
            "hub: WORKBENCH_SESSIONS_URL is set but WORKBENCH_SESSIONS_API_TOKEN (the sessions service's token) is not"
        )
    return url


def _services(policy: Policy, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The hub's services: the idle culler first (the hub starts services in order and waits a little for
    an external service that does not answer yet, as the gateway's guard may not at first), then the
    gateway (its dashboard guard: ``oauth_no_confirm``, as in the embedded mode), then the quota service
    when ``WORKBENCH_QUOTA_URL`` is set, then the sessions service when ``WORKBENCH_SESSIONS_URL`` is set.

    The sessions service culls idle servers itself (per profile), so with it the idle culler is not run:
    two cullers would fight."""
    services: list[dict[str, Any]] = []
    sessions_url = _sessions_url(env)
    if policy.culling.enabled and not sessions_url:
        if not env.get("WORKBENCH_CULLER_API_TOKEN"):
            raise K8sConfigError(
                "hub: culling is enabled in the platform YAML but WORKBENCH_CULLER_API_TOKEN is not set"
            )
        services.append(
            {
                "name": CULLER_SERVICE,
                "api_token": env["WORKBENCH_CULLER_API_TOKEN"],
                "command": [
                    sys.executable,
                    "-m",
                    "jupyterhub_idle_culler",
                    f"--url=http://127.0.0.1:{HUB_PORT}/hub/api",
                    f"--timeout={policy.culling.timeout}",
                    f"--cull-every={policy.culling.every}",
                ],
            }
        )
    services.append(
        {
            "name": GATEWAY_SERVICE,
            "url": env["WORKBENCH_GATEWAY_URL"],
            "api_token": env["WORKBENCH_GATEWAY_API_TOKEN"],
            "oauth_no_confirm": True,
        }
    )
    quota_url = _quota_url(env)
    if quota_url:
        services.append({"name": QUOTA_SERVICE, "url": quota_url, "api_token": env["WORKBENCH_QUOTA_API_TOKEN"]})
    if sessions_url:
        services.append(
            {"name": SESSIONS_SERVICE, "url": sessions_url, "api_token": env["WORKBENCH_SESSIONS_API_TOKEN"]}
        )
    rosters_url = _rosters_url(env)
    if rosters_url:
        services.append({"name": ROSTERS_SERVICE, "url": rosters_url, "api_token": env["WORKBENCH_ROSTERS_API_TOKEN"]})
    jobs_url = _jobs_url(env)
    if jobs_url:
        services.append({"name": JOBS_SERVICE, "url": jobs_url, "api_token": env["WORKBENCH_JOBS_API_TOKEN"]})
    return services


def _jobs_url(env: Mapping[str, str]) -> str:
    """The notebook jobs service's URL, when the chart runs it (``WORKBENCH_JOBS_URL``: ``jobs.enabled``), else ''."""
    url = (env.get("WORKBENCH_JOBS_URL") or "").strip()
    if url and not env.get("WORKBENCH_JOBS_API_TOKEN"):
        raise K8sConfigError("hub: WORKBENCH_JOBS_URL is set but WORKBENCH_JOBS_API_TOKEN is not")
    return url.rstrip("/")


def _rosters_url(env: Mapping[str, str]) -> str:
    """The rosters service's URL, when the chart runs it (``WORKBENCH_ROSTERS_URL``), else ''."""
    url = (env.get("WORKBENCH_ROSTERS_URL") or "").strip()
    if url and not env.get("WORKBENCH_ROSTERS_API_TOKEN"):
        raise K8sConfigError("hub: WORKBENCH_ROSTERS_URL is set but WORKBENCH_ROSTERS_API_TOKEN is not")
    return url.rstrip("/")


def _services_url(env: Mapping[str, str]) -> str:
    """``WORKBENCH_SERVICES_URL`` of notebook pods (where :mod:`workbench.lab` asks the services for the user's
    notifications): the chart's ``WORKBENCH_SERVICES_URL`` (the hub's proxy), else the quota service's
    ``/services/``, else '' (none)."""
    explicit = (env.get("WORKBENCH_SERVICES_URL") or "").strip()
    if explicit:
        return explicit.rstrip("/") + "/"
    quota_url = (env.get("WORKBENCH_QUOTA_URL") or "").strip()
    return f"{quota_url.rstrip('/')}/services/" if quota_url else ""


def culler_roles(policy: Policy) -> list[dict[str, Any]]:
    """The stock jupyterhub-idle-culler's role (Kubernetes runs it in the hub pod when the chart runs no
    sessions service; :mod:`workbench.services.sessions.app` has its own role) (pure). :func:`_roles_of_services`
    drops it when the culler does not run."""
    if not policy.culling.enabled:
        return []
    return [
        {
            "name": CULLER_SERVICE,
            "description": "Stop idle single-user servers",
            "scopes": list(CULLER_SCOPES),
            "services": [CULLER_SERVICE],
        }
    ]


def _sessions_roles(policy: Policy) -> list[dict[str, Any]]:
    """The sessions service's roles (``workbench-sessions``, ``workbench-sessions-users``) where
    :func:`workbench.embedded.hub.roles` leaves them out because the policy gives the service nothing to enforce
    (no culling, no session limit): the chart runs it all the same, and its checks and users'
    notification requests must not be refused (pure)."""
    if needs_sessions_service(policy):
        return []  # roles(policy) has them
    enforcing = policy.model_copy(update={"culling": policy.culling.model_copy(update={"enabled": True})})
    return [r for r in roles(enforcing) if r["name"].startswith("workbench-sessions")]


def _roles_of_services(role_list: list[dict[str, Any]], services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``role_list`` without the services this hub does not run (JupyterHub refuses to start on a role
    naming an undefined service): e.g. the idle culler's role when culling is off, or an embedded-only
    service's. A role left with no users, groups or services is dropped (pure)."""
    names = {s["name"] for s in services}
    out = []
    for role in role_list:
        if "services" in role:
            role = {**role, "services": [s for s in role["services"] if s in names]}
            if not any(role.get(k) for k in ("users", "groups", "services")):
                continue
        out.append(role)
    return out


def k8s_hub_settings(policy: Policy, env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """All hub settings on Kubernetes, from the policy and the hub pod's environment (pure).

    - spawner: :class:`workbench.spawn.kube.WorkbenchKubeSpawner` with :func:`workbench.spawn.kube.kube_hub_settings`
      (entitled profiles, home / group / dataset volumes, uid 1000, no privilege escalation, no service
      account token), in ``WORKBENCH_NAMESPACE``, labelled with :func:`singleuser_labels` (what the
      chart's NetworkPolicies select), with the Dask Gateway addresses in the environment;
    - login: :func:`workbench.auth.oauth.auth_settings` (the OAuth callback under ``WORKBENCH_PUBLIC_URL``);
      demo auth only when ``WORKBENCH_ALLOW_DEMO_AUTH`` is true;
    - services: ``dask-gateway`` (the dashboard guard in front of the gateway's Traefik proxy), with
      ``WORKBENCH_QUOTA_URL`` ``quota`` (its own pod; the spawner then asks it to admit every start), with ``WORKBENCH_SESSIONS_URL`` ``sessions`` (its
      own pod) and else the idle culler (in the hub pod), with ``WORKBENCH_JOBS_URL`` ``jobs`` (notebook jobs, its
      own pod: :func:`workbench.jobs.wiring.jobs_roles_for`); roles from :func:`workbench.embedded.hub.roles` and
      :func:`workbench.services.quota.wiring.quota_roles`, the quota service's custom scopes, and
      ``access:services!service=quota`` / ``access:services!service=sessions`` in notebook servers' tokens;
    - the external configurable-http-proxy (not started by the hub), the database, and
      ``cleanup_servers = False`` so that an upgrade of the hub leaves users' pods running.

    Raises :class:`K8sConfigError` for a missing variable, :class:`DemoAuthExposed` for demo auth
    not explicitly allowed, :class:`PolicyError` for a missing OAuth client secret variable.
    """
    _require(env, HUB_ENV, "hub")
    platform = env.get("WORKBENCH_PLATFORM") or DEFAULT_PLATFORM
    public_url = (env.get("WORKBENCH_PUBLIC_URL") or "").rstrip("/")
    auth_type = policy.auth.type
    if auth_type == "demo" and not _truthy(env.get("WORKBENCH_ALLOW_DEMO_AUTH")):
        raise DemoAuthExposed(
            "auth.type is 'demo' (one shared password) and this hub runs on Kubernetes. Configure SSO in the "
            "platform YAML (auth.type: generic-oauth or github); for a try-out reachable only through "
            "`kubectl port-forward`, the chart allows it (it sets WORKBENCH_ALLOW_DEMO_AUTH=true)."
        )
    if auth_type != "demo" and not public_url:
        raise K8sConfigError(
            f"hub: auth.type {auth_type!r} needs the public URL of the workbench for the OAuth callback; "
            "set publicUrl in the Helm values (WORKBENCH_PUBLIC_URL)"
        )
    auth = auth_settings(policy, _AuthRuntime(config=platform, public_url=public_url), environ=env)  # type: ignore[arg-type]

    settings = kube_hub_settings(policy, platform)
    namespace = env["WORKBENCH_NAMESPACE"]
    gateway_address = f"{env['WORKBENCH_GATEWAY_URL'].rstrip('/')}{GATEWAY_PREFIX}"
    spawner = settings["WorkbenchKubeSpawner"]
    spawner.update(
        {
            # a user's Dask clusters stop with their server (through the dashboard guard, as notebooks reach it)
            "gateway_api_url": f"{gateway_address}/api/v1",
            "namespace": namespace,
            "component_label": SINGLEUSER_COMPONENT,
            "extra_labels": {"app.kubernetes.io/instance": env["WORKBENCH_RELEASE"]},
            "image_pull_policy": "IfNotPresent",
            "image_pull_secrets": pull_secret_names(env),
            "gpu_runtime_class": (env.get("WORKBENCH_GPU_RUNTIME_CLASS") or "").strip(),
            "gpu_dev_shm": _truthy(env.get("WORKBENCH_GPU_DEV_SHM")),
            "environment": {
                "DASK_GATEWAY__ADDRESS": gateway_address,
                # dashboards: through the public proxy, where the browser already has the hub's cookie
                "DASK_GATEWAY__PUBLIC_ADDRESS": GATEWAY_PREFIX,
                "DASK_GATEWAY__PROXY_ADDRESS": env["WORKBENCH_GATEWAY_PROXY_ADDRESS"],
                "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
                "WORKBENCH_DASK_MAX_WORKERS": _max_workers_env(policy),
                # workbench.lab asks <this>quota/api/notifications and <this>sessions/api/notifications
                **({"WORKBENCH_SERVICES_URL": _services_url(env)} if _services_url(env) else {}),
            },
        }
    )
    quota = bool(_quota_url(env))
    if quota:  # every start admitted by the quota service first (budgets, caps), every stop recorded
        spawner["quota_api_url"] = quota_api_url(_quota_url(env))
        spawner["quota_api_token"] = env["WORKBENCH_QUOTA_API_TOKEN"]
    sessions = bool(_sessions_url(env))
    rosters = bool(_rosters_url(env))
    jobs = bool(_jobs_url(env))
    services = _services(policy, env)
    hub = {
        **settings["JupyterHub"],
        "hub_bind_url": f"http://:{HUB_PORT}",
        "hub_connect_url": env["WORKBENCH_HUB_CONNECT_URL"],
        "db_url": env["WORKBENCH_DB_URL"],
        "services": services,
        "load_roles": _roles_of_services(
            [
                *roles(policy),
                *culler_roles(policy),
                *(quota_roles(policy) if quota else []),
                *(_sessions_roles(policy) if sessions else []),
                *(jobs_roles_for(policy, quota) if jobs else []),
            ],
            services,
        ),
        "cleanup_servers": False,
        # the platform's own pages (branding), JupyterHub's templates extended (workbench.spawnpage)
        "template_paths": [str(SPAWN_TEMPLATES)],
        **auth["JupyterHub"],
        "template_vars": {**auth["JupyterHub"].get("template_vars", {}), **spawn_template_vars(policy)},
    }
    if quota:
        hub["custom_scopes"] = dict(QUOTA_CUSTOM_SCOPES)
    if public_url:
        hub["public_url"] = f"{public_url}/"
    subdomain_host = (env.get("WORKBENCH_SUBDOMAIN_HOST") or "").strip()
    if subdomain_host:  # hub.subdomainHost: each user's server on its own origin (workbench.origins)
        try:
            subdomain_host = check_subdomain_host(subdomain_host, "hub.subdomainHost (WORKBENCH_SUBDOMAIN_HOST)")
        except SubdomainHostError as e:
            raise K8sConfigError(f"hub: {e}") from None
        # notebooks reach the services through the proxy's in-cluster Service: that host gets their routes too
        internal = [urlsplit(_services_url(env)).hostname or ""] if _services_url(env) else []
        origins = subdomain_settings(subdomain_host, services, internal)
        hub.update(origins["JupyterHub"])
        proxy_routes = origins["ConfigurableHTTPProxy"]
        # dashboards open on the hub's origin, where the guard's login lives (a relative link would be the server's)
        spawner["environment"]["DASK_GATEWAY__PUBLIC_ADDRESS"] = f"{subdomain_host}{GATEWAY_PREFIX}"
    else:
        proxy_routes = {}
    return {
        "JupyterHub": hub,
        "ConfigurableHTTPProxy": {"should_start": False, "api_url": env["WORKBENCH_PROXY_API_URL"], **proxy_routes},
        **{section: values for section, values in auth.items() if section != "JupyterHub"},
        "Spawner": {
            "cmd": ["jupyterhub-singleuser"],
            "default_url": "/lab",
            "server_token_scopes": [
                *SERVER_TOKEN_SCOPES,
                *([QUOTA_ACCESS_SCOPE] if quota else []),
                *([SESSIONS_ACCESS_SCOPE] if sessions else []),
                *([ROSTERS_ACCESS_SCOPE] if rosters else []),
                *([JOBS_ACCESS_SCOPE] if jobs else []),
            ],
            "start_timeout": 600,  # first pull of a multi-GB GPU image on a fresh node
            "http_timeout": 120,
        },
        "WorkbenchKubeSpawner": spawner,
    }


# ---------------------------------------------------------------------------
# Watching one namespace
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Loaders (I/O): hub_config/jupyterhub_config_k8s.py, hub_config/dask_gateway_config_k8s.py
# ---------------------------------------------------------------------------


def _load(environ: Mapping[str, str]) -> Policy:
    return load_policy(environ.get("WORKBENCH_PLATFORM") or DEFAULT_PLATFORM)


def configure_k8s_hub(c, environ: Mapping[str, str] | None = None) -> None:
    """Configure the hub pod: read the mounted platform YAML, apply :func:`k8s_hub_settings`.

    A broken policy or environment stops the hub with the problems on stderr (exit status 2).
    """
    import os

    environ = os.environ if environ is None else environ
    try:
        settings = k8s_hub_settings(_load(environ), environ)
    except (PolicyError, DemoAuthExposed, K8sConfigError) as e:
        print(f"workbench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    apply_settings(c, settings)
