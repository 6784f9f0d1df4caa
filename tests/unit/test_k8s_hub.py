"""Unit tests of workbench.kubernetes.hub: hub and gateway settings on Kubernetes from (policy, environment)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from traitlets.config import Config

from workbench.auth.demo import DemoAuthExposed
from workbench.kubernetes.__main__ import main
from workbench.kubernetes.gateway import (
    NamespacedClient,
    NamespacedKubeBackend,
    NamespacedKubeController,
    configure_k8s_gateway,
    k8s_gateway_settings,
)
from workbench.kubernetes.guard import k8s_guard_settings, serve_k8s_guard
from workbench.kubernetes.hub import (
    GATEWAY_ENV,
    GUARD_ENV,
    HUB_ENV,
    K8sConfigError,
    configure_k8s_hub,
    culler_roles,
    k8s_hub_settings,
    singleuser_labels,
)
from workbench.names import SERVER_TOKEN_SCOPES
from workbench.policy import PolicyError, load_policy
from workbench.services.quota.authz import ACCESS_SCOPE as QUOTA_ACCESS_SCOPE
from workbench.services.quota.authz import CUSTOM_SCOPES as QUOTA_CUSTOM_SCOPES
from workbench.services.quota.wiring import quota_roles
from workbench.services.sessions.rules import ACCESS_SCOPE as SESSIONS_ACCESS_SCOPE
from workbench.services.sessions.rules import SERVICE_SCOPES as SESSIONS_SCOPES
from workbench.settings import roles
from workbench.spawn.kube import kubespawner_settings

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hub_config" / "demo.yaml"
CENTRE = REPO / "hub_config" / "examples" / "centre.yaml"

HUB = {
    "WORKBENCH_PLATFORM": "/etc/workbench/platform.yaml",
    "WORKBENCH_NAMESPACE": "research",
    "WORKBENCH_RELEASE": "wb",
    "WORKBENCH_PUBLIC_URL": "https://workbench.example.edu/",
    "WORKBENCH_HUB_CONNECT_URL": "http://wb-hub:8081",
    "WORKBENCH_PROXY_API_URL": "http://wb-proxy-api:8001",
    "WORKBENCH_DB_URL": "sqlite:////srv/jupyterhub/jupyterhub.sqlite",
    "WORKBENCH_GATEWAY_URL": "http://wb-gateway-guard.research:8000",
    "WORKBENCH_GATEWAY_PROXY_ADDRESS": "gateway://wb-gateway-proxy.research:8786",
    "WORKBENCH_GATEWAY_API_TOKEN": "gateway-token",
    "WORKBENCH_CULLER_API_TOKEN": "culler-token",
    "WORKBENCH_OAUTH_CLIENT_SECRET": "client-secret",
}
GATEWAY = {
    "WORKBENCH_PLATFORM": "/etc/workbench/platform.yaml",
    "WORKBENCH_NAMESPACE": "research",
    "WORKBENCH_GATEWAY_INSTANCE": "wb-gateway",
    "WORKBENCH_GATEWAY_API_URL": "http://wb-gateway-api.research:8000/api",
    "WORKBENCH_HUB_API_URL": "http://wb-hub:8081/hub/api",
}
GUARD = {
    "WORKBENCH_HUB_API_URL": "http://wb-hub:8081/hub/api",
    "WORKBENCH_GATEWAY_PROXY_URL": "http://wb-gateway-proxy.research:8000/",
    "WORKBENCH_GATEWAY_API_TOKEN": "gateway-token",
    "WORKBENCH_GUARD_COOKIE_SECRET": "ab" * 32,
}
QUOTA = {"WORKBENCH_QUOTA_URL": "http://wb-quota:8013", "WORKBENCH_QUOTA_API_TOKEN": "quota-token"}
SESSIONS = {"WORKBENCH_SESSIONS_URL": "http://wb-sessions:8014", "WORKBENCH_SESSIONS_API_TOKEN": "sessions-token"}


@pytest.fixture(scope="module")
def centre():
    return load_policy(CENTRE)


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


def test_hub_settings_for_sso(centre):
    s = k8s_hub_settings(centre, HUB)
    hub = s["JupyterHub"]
    assert hub["spawner_class"] == "workbench.spawn.kube.WorkbenchKubeSpawner"
    assert hub["authenticator_class"] == "workbench.auth.oauth.WorkbenchGenericOAuthenticator"
    assert hub["hub_bind_url"] == "http://:8081"
    assert hub["hub_connect_url"] == "http://wb-hub:8081"
    assert hub["db_url"] == "sqlite:////srv/jupyterhub/jupyterhub.sqlite"
    assert hub["public_url"] == "https://workbench.example.edu/"
    assert hub["cleanup_servers"] is False
    services = {s["name"] for s in hub["services"]}
    expected_roles = [r for r in [*roles(centre), *culler_roles(centre)] if set(r.get("services", [])) <= services]
    assert hub["load_roles"] == expected_roles  # roles of services this hub does not run are left out
    assert hub["services"] == [
        {
            "name": "idle-culler",
            "api_token": "culler-token",
            "command": [
                sys.executable,
                "-m",
                "jupyterhub_idle_culler",
                "--url=http://127.0.0.1:8081/hub/api",
                "--timeout=7200",
                "--cull-every=600",
            ],
        },
        # the dashboard guard (workbench.gateway.dashguard), logging browsers in with no consent page
        {
            "name": "dask-gateway",
            "url": "http://wb-gateway-guard.research:8000",
            "api_token": "gateway-token",
            "oauth_no_confirm": True,
        },
    ]
    assert "custom_scopes" not in hub  # no quota service without WORKBENCH_QUOTA_URL
    assert "cookie_secret" not in hub  # from JPY_COOKIE_SECRET in the pod, never in the settings
    assert s["ConfigurableHTTPProxy"] == {"should_start": False, "api_url": "http://wb-proxy-api:8001"}
    assert s["Spawner"] == {
        "cmd": ["jupyterhub-singleuser"],
        "default_url": "/lab",
        "server_token_scopes": SERVER_TOKEN_SCOPES,
        "start_timeout": 600,
        "http_timeout": 120,
    }
    oauth = s["WorkbenchGenericOAuthenticator"]
    assert oauth["oauth_callback_url"] == "https://workbench.example.edu/hub/oauth_callback"
    assert oauth["client_secret_env"] == "WORKBENCH_OAUTH_CLIENT_SECRET"
    assert "client-secret" not in repr(s)
    assert s["Authenticator"] == {"manage_groups": True, "allow_all": False}


def test_spawner_settings_extend_the_policys(centre):
    spawner = k8s_hub_settings(centre, HUB)["WorkbenchKubeSpawner"]
    base = {"policy_path": "/etc/workbench/platform.yaml", **kubespawner_settings(centre)}
    assert {k: spawner[k] for k in base} == base  # locked-down pods, volumes: exactly workbench.spawn.kube's
    assert spawner["automount_service_account_token"] is False
    assert spawner["namespace"] == "research"
    assert spawner["component_label"] == "singleuser-server"
    assert spawner["extra_labels"] == {"app.kubernetes.io/instance": "wb"}
    assert singleuser_labels("wb") == {
        "app.kubernetes.io/instance": "wb",
        "app.kubernetes.io/component": "singleuser-server",
    }
    assert spawner["image_pull_secrets"] == []
    env = dict(spawner["environment"])
    max_workers = env.pop("WORKBENCH_DASK_MAX_WORKERS")
    assert env == {
        "DASK_GATEWAY__ADDRESS": "http://wb-gateway-guard.research:8000/services/dask-gateway",
        "DASK_GATEWAY__PUBLIC_ADDRESS": "/services/dask-gateway",
        "DASK_GATEWAY__PROXY_ADDRESS": "gateway://wb-gateway-proxy.research:8786",
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
    }

    class G:
        def __init__(self, name):
            self.name = name

    class S:
        def __init__(self, *groups):
            self.user = type("User", (), {"groups": [G(g) for g in groups]})()

    assert max_workers(S("climate-lab", "unknown")) == "64"
    assert max_workers(S("nobody")) == "0"


def test_image_pull_secrets(centre):
    env = {**HUB, "WORKBENCH_IMAGE_PULL_SECRETS": "registry, mirror ,"}
    assert k8s_hub_settings(centre, env)["WorkbenchKubeSpawner"]["image_pull_secrets"] == ["registry", "mirror"]


def test_missing_environment_is_named(centre):
    env = {k: v for k, v in HUB.items() if k not in ("WORKBENCH_NAMESPACE", "WORKBENCH_DB_URL")}
    with pytest.raises(K8sConfigError) as err:
        k8s_hub_settings(centre, env)
    assert "WORKBENCH_NAMESPACE" in str(err.value) and "WORKBENCH_DB_URL" in str(err.value)
    assert all(name.startswith("WORKBENCH_") for name in (*HUB_ENV, *GATEWAY_ENV, *GUARD_ENV))


def test_sso_needs_the_public_url_and_the_client_secret(centre):
    with pytest.raises(K8sConfigError, match="publicUrl"):
        k8s_hub_settings(centre, {**HUB, "WORKBENCH_PUBLIC_URL": ""})
    env = {k: v for k, v in HUB.items() if k != "WORKBENCH_OAUTH_CLIENT_SECRET"}
    with pytest.raises(PolicyError, match="WORKBENCH_OAUTH_CLIENT_SECRET"):
        k8s_hub_settings(centre, env)


def test_demo_auth_only_when_the_chart_allows_it(demo):
    env = {k: v for k, v in HUB.items() if k != "WORKBENCH_PUBLIC_URL"}
    with pytest.raises(DemoAuthExposed, match="Kubernetes"):
        k8s_hub_settings(demo, env)
    s = k8s_hub_settings(demo, {**env, "WORKBENCH_ALLOW_DEMO_AUTH": "true"})
    assert s["JupyterHub"]["authenticator_class"] == "workbench.auth.demo.DemoAuthenticator"
    assert "public_url" not in s["JupyterHub"]


def test_the_stock_culler_has_its_role_on_kubernetes(centre):
    hub = k8s_hub_settings(centre, HUB)["JupyterHub"]
    (role,) = [r for r in hub["load_roles"] if r.get("services") == ["idle-culler"]]
    assert role["scopes"] == ["list:users", "read:users:activity", "read:servers", "delete:servers"]
    # the embedded mode's sessions service does not run here, nor may a role name it
    assert not [r for r in hub["load_roles"] if "sessions" in r.get("services", [])]


def test_culler_token_needed_only_with_culling(centre):
    env = {k: v for k, v in HUB.items() if k != "WORKBENCH_CULLER_API_TOKEN"}
    with pytest.raises(K8sConfigError, match="WORKBENCH_CULLER_API_TOKEN"):
        k8s_hub_settings(centre, env)
    no_culling = centre.model_copy(update={"culling": centre.culling.model_copy(update={"enabled": False})})
    hub = k8s_hub_settings(no_culling, env)["JupyterHub"]
    assert [s["name"] for s in hub["services"]] == ["dask-gateway"]
    # JupyterHub refuses to start on a role naming a service it does not define
    assert not [r for r in hub["load_roles"] if "idle-culler" in r.get("services", [])]


def test_the_quota_service_is_registered_when_the_chart_runs_it(centre):
    s = k8s_hub_settings(centre, {**HUB, **QUOTA})
    hub = s["JupyterHub"]
    assert [svc["name"] for svc in hub["services"]] == ["idle-culler", "dask-gateway", "quota"]
    assert hub["services"][-1] == {"name": "quota", "url": "http://wb-quota:8013", "api_token": "quota-token"}
    for role in quota_roles(centre):  # workbench.services.quota.wiring's roles, as in the embedded mode
        assert role in hub["load_roles"]
    assert hub["custom_scopes"] == QUOTA_CUSTOM_SCOPES
    assert s["Spawner"]["server_token_scopes"] == [*SERVER_TOKEN_SCOPES, QUOTA_ACCESS_SCOPE]
    # the spawner asks the service to admit every start (as the local spawner does), with the service's token
    spawner = s["WorkbenchKubeSpawner"]
    assert spawner["quota_api_url"] == "http://wb-quota:8013/services/quota/api"
    assert spawner["quota_api_token"] == "quota-token"
    # and the token goes nowhere else: not into notebook pods' environment, not into other sections
    rest = {k: v for k, v in s.items() if k not in ("JupyterHub", "WorkbenchKubeSpawner")}
    assert "quota-token" not in repr(rest) + repr({k: v for k, v in spawner.items() if k != "quota_api_token"})


def test_the_quota_service_needs_its_token(centre):
    with pytest.raises(K8sConfigError, match="WORKBENCH_QUOTA_API_TOKEN"):
        k8s_hub_settings(centre, {**HUB, "WORKBENCH_QUOTA_URL": "http://wb-quota:8013"})
    # a token alone (quota.enabled false, or a stale variable) registers nothing
    hub = k8s_hub_settings(centre, {**HUB, "WORKBENCH_QUOTA_API_TOKEN": "quota-token"})["JupyterHub"]
    assert "quota" not in [svc["name"] for svc in hub["services"]]
    assert not [r for r in hub["load_roles"] if r["name"].startswith("workbench-quota")]


def test_the_sessions_service_replaces_the_idle_culler(centre):
    """With WORKBENCH_SESSIONS_URL the hub registers the external service sessions, with the roles
    workbench.embedded.hub.roles() gives it, and runs no idle culler (two cullers would fight): no culler
    service, no culler role, and no culler token needed."""
    env = {k: v for k, v in HUB.items() if k != "WORKBENCH_CULLER_API_TOKEN"}
    s = k8s_hub_settings(centre, {**env, **QUOTA, **SESSIONS})
    hub = s["JupyterHub"]
    assert [svc["name"] for svc in hub["services"]] == ["dask-gateway", "quota", "sessions"]
    assert hub["services"][-1] == {"name": "sessions", "url": "http://wb-sessions:8014", "api_token": "sessions-token"}
    names = [r["name"] for r in hub["load_roles"]]
    assert "idle-culler" not in names
    assert not [r for r in hub["load_roles"] if "idle-culler" in r.get("services", [])]
    [service_role] = [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert service_role["services"] == ["sessions"] and service_role["scopes"] == SESSIONS_SCOPES
    [users_role] = [r for r in hub["load_roles"] if r["name"] == "workbench-sessions-users"]
    assert users_role["scopes"] == [SESSIONS_ACCESS_SCOPE] and set(users_role["groups"]) == set(centre.groups)
    services = {svc["name"] for svc in hub["services"]}
    expected = [r for r in [*roles(centre), *quota_roles(centre)] if set(r.get("services", [])) <= services]
    assert hub["load_roles"] == expected  # all of roles() but the embedded-only rosters service's
    assert s["Spawner"]["server_token_scopes"] == [*SERVER_TOKEN_SCOPES, QUOTA_ACCESS_SCOPE, SESSIONS_ACCESS_SCOPE]
    assert "sessions-token" not in repr({k: v for k, v in s.items() if k != "JupyterHub"})


def test_the_sessions_service_has_its_roles_with_nothing_to_enforce(centre):
    """No culling and no session limit: workbench.embedded.hub.roles() gives the sessions service no role, but the chart
    runs it, so the hub gives it (and its users) the same roles: no refused checks or notifications."""
    quiet = centre.model_copy(
        update={
            "culling": centre.culling.model_copy(update={"enabled": False}),
            "groups": {n: g.model_copy(update={"session": None}) for n, g in centre.groups.items()},
            "profiles": {n: p.model_copy(update={"session": None}) for n, p in centre.profiles.items()},
        }
    )
    assert not [r for r in roles(quiet) if r["name"].startswith("workbench-sessions")]
    hub = k8s_hub_settings(quiet, {**HUB, **SESSIONS})["JupyterHub"]
    names = [r["name"] for r in hub["load_roles"]]
    assert names.count("workbench-sessions") == 1 and names.count("workbench-sessions-users") == 1
    # with something to enforce, roles() has them, once
    names = [r["name"] for r in k8s_hub_settings(centre, {**HUB, **SESSIONS})["JupyterHub"]["load_roles"]]
    assert names.count("workbench-sessions") == 1 and names.count("workbench-sessions-users") == 1


def test_the_sessions_service_needs_its_token(centre):
    with pytest.raises(K8sConfigError, match="WORKBENCH_SESSIONS_API_TOKEN"):
        k8s_hub_settings(centre, {**HUB, "WORKBENCH_SESSIONS_URL": "http://wb-sessions:8014"})


def test_without_the_sessions_service_the_idle_culler_is_back(centre):
    """sessions.enabled false: no WORKBENCH_SESSIONS_URL, today's stock culler (a stale token registers nothing)."""
    s = k8s_hub_settings(centre, {**HUB, **QUOTA, "WORKBENCH_SESSIONS_API_TOKEN": "sessions-token"})
    hub = s["JupyterHub"]
    assert [svc["name"] for svc in hub["services"]] == ["idle-culler", "dask-gateway", "quota"]
    assert [r for r in hub["load_roles"] if r.get("services") == ["idle-culler"]]
    assert not [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert SESSIONS_ACCESS_SCOPE not in s["Spawner"]["server_token_scopes"]


def test_notebooks_reach_the_services_where_the_chart_says(centre):
    """WORKBENCH_SERVICES_URL of notebook pods: the chart's (the hub's proxy), else the quota service's, else none."""

    def services_url(env):
        return k8s_hub_settings(centre, env)["WorkbenchKubeSpawner"]["environment"].get("WORKBENCH_SERVICES_URL")

    proxy = {"WORKBENCH_SERVICES_URL": "http://wb-proxy-public:80/services"}
    assert services_url({**HUB, **QUOTA, **SESSIONS, **proxy}) == "http://wb-proxy-public:80/services/"
    assert services_url({**HUB, **QUOTA}) == "http://wb-quota:8013/services/"
    assert services_url(HUB) is None


def test_guard_settings():
    g = k8s_guard_settings(GUARD)
    assert (g.hub_api_url, g.upstream, g.api_token, g.port) == (
        "http://wb-hub:8081/hub/api",
        "http://wb-gateway-proxy.research:8000",
        "gateway-token",
        8000,
    )
    from workbench.gateway.dashguard import derive_cookie_secret

    assert g.cookie_secret == derive_cookie_secret("ab" * 32)
    assert "gateway-token" not in repr(g) and "abab" not in repr(g)
    assert k8s_guard_settings({**GUARD, "WORKBENCH_GUARD_PORT": "8123"}).port == 8123
    with pytest.raises(K8sConfigError, match="WORKBENCH_GUARD_COOKIE_SECRET"):
        k8s_guard_settings({k: v for k, v in GUARD.items() if k != "WORKBENCH_GUARD_COOKIE_SECRET"})
    with pytest.raises(K8sConfigError, match="must be hex"):
        k8s_guard_settings({**GUARD, "WORKBENCH_GUARD_COOKIE_SECRET": "not hex"})


def test_the_guard_serves_until_stopped():
    """serve_k8s_guard runs workbench.gateway.dashguard's app: a dashboard without credentials goes to the hub's login."""
    import socket

    from tornado.httpclient import AsyncHTTPClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = k8s_guard_settings({**GUARD, "WORKBENCH_GUARD_PORT": str(port)})

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(serve_k8s_guard(settings, stop))
        client = AsyncHTTPClient(force_instance=True)
        try:
            for _ in range(100):
                try:
                    r = await client.fetch(
                        f"http://127.0.0.1:{port}/services/dask-gateway/clusters/research.abc/status",
                        follow_redirects=False,
                        raise_error=False,
                    )
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
            return r.code, r.headers.get("Location", "")
        finally:
            client.close()
            stop.set()
            await asyncio.wait_for(task, 5)

    code, location = asyncio.run(go())
    assert code == 302 and "/hub/api/oauth2/authorize" in location and "client_id=service-dask-gateway" in location


def test_gateway_settings(centre):
    s = k8s_gateway_settings(centre, GATEWAY)
    assert s["DaskGateway"] == {
        "backend_class": "workbench.kubernetes.gateway.NamespacedKubeBackend",
        "address": ":8000",
        "log_level": "INFO",
        "authenticator_class": "dask_gateway_server.auth.JupyterHubAuthenticator",
    }
    assert s["JupyterHubAuthenticator"] == {
        "jupyterhub_api_url": "http://wb-hub:8081/hub/api",
        "jupyterhub_service_name": "dask-gateway",
        "use_service_access_scopes": True,
    }
    assert s["KubeBackend"] == {"gateway_instance": "wb-gateway", "api_url": "http://wb-gateway-api.research:8000/api"}
    assert s["NamespacedKubeBackend"] == {"watch_namespace": "research"}
    assert s["NamespacedKubeController"] == {"watch_namespace": "research"}
    assert s["KubeController"] == {
        "address": ":8000",
        "gateway_instance": "wb-gateway",
        "api_url": "http://wb-gateway-api.research:8000/api",
        "proxy_prefix": "/services/dask-gateway",
        "proxy_web_entrypoint": "web",
        "proxy_tcp_entrypoint": "tcp",
        "proxy_web_middlewares": [{"name": "wb-gateway-clusters-prefix", "namespace": "research"}],
    }
    assert s["KubeClusterConfig"]["namespace"] == "research"
    with pytest.raises(K8sConfigError, match="WORKBENCH_GATEWAY_INSTANCE"):
        k8s_gateway_settings(centre, {k: v for k, v in GATEWAY.items() if k != "WORKBENCH_GATEWAY_INSTANCE"})
    assert s["WorkbenchKubeBackend"] == {"policy_path": "/etc/workbench/platform.yaml"}  # no quota service


def test_gateway_settings_with_the_quota_service(centre):
    """With WORKBENCH_QUOTA_URL the backend admits and accounts clusters with the quota service, with the gateway's
    own service token (a quota writer by role); a backend given the URL but no token refuses to start."""
    import asyncio

    from workbench.gateway.kube import WorkbenchKubeBackend

    env = {**GATEWAY, "WORKBENCH_QUOTA_URL": "http://wb-quota:8013", "JUPYTERHUB_API_TOKEN": "gateway-token"}
    assert k8s_gateway_settings(centre, env)["WorkbenchKubeBackend"] == {
        "policy_path": "/etc/workbench/platform.yaml",
        "quota_api_url": "http://wb-quota:8013/services/quota/api",
        "quota_api_token": "gateway-token",
    }
    backend = WorkbenchKubeBackend(quota_api_url="http://wb-quota:8013/services/quota/api", gateway_instance="g")
    with pytest.raises(ValueError, match="quota_api_token is empty.*custom:workbench-quota:write"):
        asyncio.run(backend.setup(None))


# ---------------------------------------------------------------------------
# Watching one namespace
# ---------------------------------------------------------------------------


class FakeApi:
    """Records calls; every list returns an empty list, every watch waits forever."""

    api_client = "the-api-client"

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        async def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if kwargs.get("watch"):
                await asyncio.sleep(3600)
            return {"items": [], "metadata": {"resourceVersion": "1"}}

        return call


def test_namespaced_client_turns_cluster_wide_lists_into_namespaced_ones():
    api = FakeApi()
    client = NamespacedClient(api, "research")

    async def go():
        await client.list_pod_for_all_namespaces(label_selector="a=b", resource_version="7")
        await client.list_endpoints_for_all_namespaces(label_selector="c=d")
        await client.list_cluster_custom_object("gateway.dask.org", "v1alpha1", "daskclusters", label_selector="e=f")
        await client.create_namespaced_pod("research", {"kind": "Pod"})

    asyncio.run(go())
    assert api.calls == [
        ("list_namespaced_pod", ("research",), {"label_selector": "a=b", "resource_version": "7"}),
        ("list_namespaced_endpoints", ("research",), {"label_selector": "c=d"}),
        (
            "list_namespaced_custom_object",
            ("gateway.dask.org", "v1alpha1", "research", "daskclusters"),
            {"label_selector": "e=f"},
        ),
        ("create_namespaced_pod", ("research", {"kind": "Pod"}), {}),
    ]
    assert client.api_client == "the-api-client"


def test_controller_and_backend_wrap_their_clients():
    config = Config({"NamespacedKubeController": {"watch_namespace": "research", "gateway_instance": "wb-gateway"}})
    controller = NamespacedKubeController(config=config)
    with pytest.raises(AttributeError):
        controller.core_client  # noqa: B018 - unset until setup()
    controller.core_client = FakeApi()
    controller.custom_client = FakeApi()
    assert isinstance(controller.core_client, NamespacedClient)
    assert isinstance(controller.custom_client, NamespacedClient)

    backend = NamespacedKubeBackend(
        config=Config({"NamespacedKubeBackend": {"watch_namespace": "research"}}), gateway_instance="wb-gateway"
    )
    backend.custom_client = FakeApi()
    assert isinstance(backend.custom_client, NamespacedClient)
    upstream = NamespacedKubeBackend(gateway_instance="wb-gateway")  # no namespace: upstream's behaviour
    plain = FakeApi()
    upstream.custom_client = plain
    assert upstream.custom_client is plain


def test_dask_gateways_informer_lists_in_the_namespace():
    """dask-gateway's own Informer, as the controller builds it, lists pods of one namespace only."""
    from dask_gateway_server.backends.kubernetes.utils import Informer

    controller = NamespacedKubeController(
        config=Config({"NamespacedKubeController": {"watch_namespace": "research", "gateway_instance": "wb-gateway"}})
    )
    api = FakeApi()
    api.sanitize_for_serialization = lambda obj: obj
    api.api_client = api
    controller.core_client = api
    informer = Informer(
        parent=controller,
        name="pod",
        client=controller.core_client,
        method="list_pod_for_all_namespaces",
        method_kwargs={"label_selector": "gateway.dask.org/instance=wb-gateway"},
        on_update=lambda *a, **k: None,
        on_delete=lambda *a, **k: None,
    )

    async def go():
        await asyncio.wait_for(informer.start(), 5)
        for _ in range(50):  # let the informer start watching
            if len(api.calls) > 1:
                break
            await asyncio.sleep(0.01)
        await informer.stop()

    asyncio.run(go())
    assert api.calls[0] == (
        "list_namespaced_pod",
        ("research",),
        {"label_selector": "gateway.dask.org/instance=wb-gateway"},
    )
    name, args, kwargs = api.calls[1]  # then the watch, in the namespace too
    assert (name, args, kwargs["watch"]) == ("list_namespaced_pod", ("research",), True)


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def test_hub_loader_applies_the_settings(tmp_path):
    env = {**HUB, "WORKBENCH_PLATFORM": str(CENTRE)}
    c = Config()
    configure_k8s_hub(c, env)
    assert c.JupyterHub.hub_connect_url == "http://wb-hub:8081"
    assert c.WorkbenchKubeSpawner.policy_path == str(CENTRE)
    broken = tmp_path / "platform.yaml"
    broken.write_text("groups: {lab: {kind: club}}\n")
    with pytest.raises(SystemExit) as exit_:
        configure_k8s_hub(Config(), {**env, "WORKBENCH_PLATFORM": str(broken)})
    assert exit_.value.code == 2


def test_gateway_loader_applies_the_settings(capsys):
    c = Config()
    configure_k8s_gateway(c, {**GATEWAY, "WORKBENCH_PLATFORM": str(CENTRE)})
    assert c.DaskGateway.backend_class == "workbench.kubernetes.gateway.NamespacedKubeBackend"
    with pytest.raises(SystemExit):
        configure_k8s_gateway(Config(), {"WORKBENCH_PLATFORM": str(CENTRE)})
    assert "WORKBENCH_NAMESPACE" in capsys.readouterr().err


def test_hub_config_files_are_thin_loaders():
    for name, call in (
        ("jupyterhub_config_k8s.py", "configure_k8s_hub(c)"),
        ("dask_gateway_config_k8s.py", "configure_k8s_gateway(c)"),
    ):
        code = [
            line for line in (REPO / "hub_config" / name).read_text().splitlines() if line and not line.startswith("#")
        ]
        assert code[0].startswith("from workbench.kubernetes.") and code[1].startswith(call)
        assert len(code) == 2


def test_controller_entry_point_usage(capsys, monkeypatch):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "kube-controller" in err and "dashguard" in err
    for name in GUARD_ENV:
        monkeypatch.delenv(name, raising=False)
    assert main(["dashguard"]) == 2  # its environment is missing: named, exit status 2
    assert "WORKBENCH_GATEWAY_PROXY_URL" in capsys.readouterr().err


ROSTERS = {"WORKBENCH_ROSTERS_URL": "http://wb-rosters:8015", "WORKBENCH_ROSTERS_API_TOKEN": "rosters-token"}


def test_the_rosters_service_is_registered_when_the_chart_runs_it(demo):
    """The chart runs the rosters service when the policy has a course: the hub registers it, keeps its role
    (admin:users + the course groups) and lets notebook tokens reach it (instructors' notebooks load rosters)."""
    env = {**HUB, **ROSTERS, "WORKBENCH_ALLOW_DEMO_AUTH": "true"}
    s = k8s_hub_settings(demo, env)
    hub = s["JupyterHub"]
    assert {"name": "rosters", "url": "http://wb-rosters:8015", "api_token": "rosters-token"} in hub["services"]
    [role] = [r for r in hub["load_roles"] if r["name"] == "workbench-rosters"]
    assert role["services"] == ["rosters"] and "admin:users" in role["scopes"]
    assert "access:services!service=rosters" in s["Spawner"]["server_token_scopes"]
    # without the service the role (naming an undefined service) and the scope are gone
    plain = k8s_hub_settings(demo, {**HUB, "WORKBENCH_ALLOW_DEMO_AUTH": "true"})
    assert "rosters" not in [svc["name"] for svc in plain["JupyterHub"]["services"]]
    assert not [r for r in plain["JupyterHub"]["load_roles"] if r["name"] == "workbench-rosters"]
    assert "access:services!service=rosters" not in plain["Spawner"]["server_token_scopes"]


def test_the_rosters_service_needs_its_token(demo):
    with pytest.raises(K8sConfigError, match="WORKBENCH_ROSTERS_API_TOKEN"):
        k8s_hub_settings(demo, {**HUB, "WORKBENCH_ALLOW_DEMO_AUTH": "true", "WORKBENCH_ROSTERS_URL": "http://r:8015"})


def test_gpu_pod_settings_from_the_chart(centre):
    s = k8s_hub_settings(centre, {**HUB, "WORKBENCH_GPU_RUNTIME_CLASS": "nvidia", "WORKBENCH_GPU_DEV_SHM": "true"})
    assert s["WorkbenchKubeSpawner"]["gpu_runtime_class"] == "nvidia"
    assert s["WorkbenchKubeSpawner"]["gpu_dev_shm"] is True
    plain = k8s_hub_settings(centre, HUB)["WorkbenchKubeSpawner"]
    assert plain["gpu_runtime_class"] == "" and plain["gpu_dev_shm"] is False
