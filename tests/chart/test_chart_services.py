"""The quota and sessions services in the chart, rendered with a real Helm: registered in the hub, their
storage, who reaches them, and what turning them off renders."""

from __future__ import annotations

import ipaddress

import kubernetes_validate

from workbench.kubernetes.hub import k8s_hub_settings
from workbench.services.quota.authz import ACCESS_SCOPE as QUOTA_ACCESS_SCOPE
from workbench.services.quota.authz import CUSTOM_SCOPES as QUOTA_CUSTOM_SCOPES
from workbench.services.quota.wiring import quota_roles
from workbench.services.sessions.rules import ACCESS_SCOPE as SESSIONS_ACCESS_SCOPE
from workbench.services.sessions.rules import SERVICE_SCOPES as SESSIONS_SCOPES

from .chartlib import (
    METADATA,
    OAUTH_SECRET,
    TRAEFIK_KINDS,
    _core,
    _peer_components,
    _policies,
    _ports,
    _reaches,
    platform_policy,
)
from .conftest import (
    K8S_VERSION,
    PRODUCTION,
    RELEASE,
    container_env,
    find,
    helm_template,
    one,
    secret_data,
)

# ---------------------------------------------------------------------------
# The quota service
# ---------------------------------------------------------------------------


def _quota_container(objects) -> dict:
    [container] = one(objects, "Deployment", f"{RELEASE}-quota")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_quota_service_is_registered_in_the_hub(objects):
    """The quota Deployment runs `python -m workbench.services.quota` on the platform ConfigMap; the hub, from its
    rendered environment, registers it as the external service quota with its roles and scopes."""
    container = _quota_container(objects)
    assert container["command"][:4] == [
        "python",
        "-m",
        "workbench.services.quota",
        "--config=/etc/workbench/platform.yaml",
    ]
    assert "--reconcile-every=60" in container["command"] and "--port=8013" in container["command"]
    quota_env = container_env(objects, f"{RELEASE}-quota", OAUTH_SECRET)
    hub_env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert (
        quota_env["JUPYTERHUB_API_TOKEN"]
        == hub_env["WORKBENCH_QUOTA_API_TOKEN"]
        == secret_data(objects)["quota-api-token"]
    )
    assert quota_env["JUPYTERHUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    assert quota_env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/quota/"
    [port] = one(objects, "Service", f"{RELEASE}-quota")["spec"]["ports"]
    assert port["port"] == 8013 and port["targetPort"] == "http"

    policy = platform_policy(objects)
    settings = k8s_hub_settings(policy, hub_env)
    hub = settings["JupyterHub"]
    [quota] = [s for s in hub["services"] if s["name"] == "quota"]
    assert quota == {
        "name": "quota",
        "url": f"http://{RELEASE}-quota:8013",
        "api_token": quota_env["JUPYTERHUB_API_TOKEN"],
    }
    assert all(role in hub["load_roles"] for role in quota_roles(policy))
    assert hub["custom_scopes"] == QUOTA_CUSTOM_SCOPES
    assert QUOTA_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_the_quota_ledger_is_sqlite_on_a_kept_pvc_by_default(default_objects, helm):
    container = _quota_container(default_objects)
    assert "--state-dir=/srv/quota" in container["command"]
    assert {"name": "ledger", "mountPath": "/srv/quota"} in container["volumeMounts"]
    assert "WORKBENCH_QUOTA_DB_URL" not in container_env(default_objects, f"{RELEASE}-quota")
    pvc = one(default_objects, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi" and "storageClassName" not in pvc["spec"]
    dep = one(default_objects, "Deployment", f"{RELEASE}-quota")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    sized = helm_template(
        helm,
        "--set",
        "quota.db.pvc.size=5Gi",
        "--set",
        "quota.db.pvc.storageClassName=fast",
        "--set",
        "quota.reconcileEvery=300",
    )
    pvc = one(sized, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi" and pvc["spec"]["storageClassName"] == "fast"
    assert "--reconcile-every=300" in _quota_container(sized)["command"]


def test_the_quota_ledger_on_postgresql_comes_from_the_operators_secret(helm):
    objects = helm_template(helm, "--set", "quota.db.url.existingSecret=workbench-quota-db")
    env = container_env(objects, f"{RELEASE}-quota", OAUTH_SECRET)
    assert env["WORKBENCH_QUOTA_DB_URL"] == "postgresql+psycopg://quota@db/quota"
    container = _quota_container(objects)
    assert not any(a.startswith("--state-dir") for a in container["command"])
    assert "ledger" not in {m["name"] for m in container["volumeMounts"]}
    assert not find(objects, "PersistentVolumeClaim", f"{RELEASE}-quota-db")
    for obj in objects:
        if obj["kind"] not in TRAEFIK_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the database may be anywhere: egress is not restricted (as the hub's); ingress is
    spec = _policies(objects)["quota"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec


def test_the_quota_service_is_reached_by_the_hub_the_proxy_the_gateway_and_the_jobs_service_only(objects):
    policies = _policies(objects)
    spec = policies["quota"]
    [ingress] = _core(spec["ingress"], "from")
    # notebook pods ask through the proxy (WORKBENCH_SERVICES_URL), never the pod directly; the jobs service
    # asks for admission and records its runs' usage
    assert _peer_components(ingress["from"], objects) == {"hub", "proxy", "gateway-api", "jobs"}
    assert _ports(ingress) == {8013}
    if "egress" in spec:  # SQLite: the hub API and DNS only (PostgreSQL: see the test above)
        reached = {}
        for rule in spec["egress"]:
            for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
                reached[comp] = _ports(rule)
        assert reached.pop("hub") == {8081}
        assert all(k.startswith("dns:") for k in reached)
    else:
        assert spec["policyTypes"] == ["Ingress"] and "WORKBENCH_QUOTA_DB_URL" in {
            e["name"] for e in _quota_container(objects)["env"]
        }
    assert any(
        8013 in _ports(r) and _peer_components(r["to"], objects) == {"quota"} for r in policies["proxy"]["egress"]
    )


def test_quota_disabled_renders_nothing_of_it(helm):
    objects = helm_template(helm, "--values", str(PRODUCTION), "--set", "quota.enabled=false")
    for obj in objects:
        assert "quota" not in obj["metadata"]["name"], obj["metadata"]["name"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/component") != "quota", obj["metadata"]["name"]
    assert "quota-api-token" not in secret_data(objects)
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert not [k for k in env if "QUOTA" in k]
    policies = _policies(objects)
    assert "quota" not in set().union(*(_peer_components(r["from"], objects) for r in policies["hub"]["ingress"]))
    assert all("quota" not in _peer_components(r["to"], objects) for r in policies["proxy"]["egress"])
    settings = k8s_hub_settings(platform_policy(objects), env)
    assert [s["name"] for s in settings["JupyterHub"]["services"]] == ["dask-gateway", "sessions", "rosters", "jobs"]
    assert "custom_scopes" not in settings["JupyterHub"]
    assert QUOTA_ACCESS_SCOPE not in settings["Spawner"]["server_token_scopes"]
    assert not [r for r in settings["JupyterHub"]["load_roles"] if r["name"].startswith("workbench-quota")]


# ---------------------------------------------------------------------------
# The sessions service
# ---------------------------------------------------------------------------


def _sessions_pod(objects) -> tuple[dict, dict]:
    spec = one(objects, "Deployment", f"{RELEASE}-sessions")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    return spec, container


def test_the_sessions_service_is_registered_in_the_hub_instead_of_the_culler(objects):
    """The sessions Deployment runs `python -m workbench.services.sessions.app` on the platform ConfigMap with the environment
    of a hub-managed service; the hub, from its rendered environment, registers it as the external service
    sessions with the roles workbench.embedded.hub.roles() gives it, and runs no idle culler (two cullers would fight)."""
    spec, container = _sessions_pod(objects)
    assert container["command"] == [
        "python",
        "-m",
        "workbench.services.sessions",
        "--config=/etc/workbench/platform.yaml",
        "--ip=0.0.0.0",
        "--port=8014",
    ]  # --interval: the policy's culling.every
    env = container_env(objects, f"{RELEASE}-sessions", OAUTH_SECRET)
    hub_env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert (
        env["JUPYTERHUB_API_TOKEN"]
        == hub_env["WORKBENCH_SESSIONS_API_TOKEN"]
        == secret_data(objects)["sessions-api-token"]
    )
    assert env["JUPYTERHUB_API_URL"] == f"http://{RELEASE}-hub:8081/hub/api"
    assert env["JUPYTERHUB_SERVICE_URL"] == hub_env["WORKBENCH_SESSIONS_URL"] == f"http://{RELEASE}-sessions:8014"
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/sessions/"
    [port] = one(objects, "Service", f"{RELEASE}-sessions")["spec"]["ports"]
    assert port["port"] == 8014 and port["targetPort"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": 8014}]
    for probe in ("readinessProbe", "livenessProbe"):  # its unauthenticated health endpoint
        assert container[probe]["httpGet"] == {"path": "/services/sessions/api/health", "port": "http"}
    # no service account token, no volume but the platform YAML and /tmp, one replica (its memory is the state)
    assert spec["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", f"{RELEASE}-sessions")["automountServiceAccountToken"] is False
    assert {v["name"] for v in spec["volumes"]} <= {"platform", "tmp"}
    assert one(objects, "Deployment", f"{RELEASE}-sessions")["spec"]["replicas"] == 1
    assert "WORKBENCH_CULLER_API_TOKEN" not in hub_env and "culler-api-token" not in secret_data(objects)

    policy = platform_policy(objects)
    settings = k8s_hub_settings(policy, hub_env)
    hub = settings["JupyterHub"]
    [sessions] = [s for s in hub["services"] if s["name"] == "sessions"]
    assert sessions == {
        "name": "sessions",
        "url": f"http://{RELEASE}-sessions:8014",
        "api_token": env["JUPYTERHUB_API_TOKEN"],
    }
    assert "idle-culler" not in {s["name"] for s in hub["services"]}
    assert not [r for r in hub["load_roles"] if r["name"] == "idle-culler" or "idle-culler" in r.get("services", [])]
    [role] = [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert role["services"] == ["sessions"] and role["scopes"] == SESSIONS_SCOPES
    assert [r for r in hub["load_roles"] if r["name"] == "workbench-sessions-users"]
    assert SESSIONS_ACCESS_SCOPE in settings["Spawner"]["server_token_scopes"]


def test_the_sessions_interval_comes_from_values(helm):
    objects = helm_template(helm, "--set", "sessions.interval=30")
    assert _sessions_pod(objects)[1]["command"][-1] == "--interval=30"


def test_the_sessions_service_is_reached_by_the_hub_and_the_proxy_and_reaches_the_hub_only(objects):
    policies = _policies(objects)
    spec = policies["sessions"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = spec["ingress"]
    # notebook pods ask for their notifications through the proxy (/services/sessions), never directly
    assert _peer_components(ingress["from"], objects) == {"hub", "proxy"} and _ports(ingress) == {8014}
    reached = {}
    for rule in spec["egress"]:
        for comp in _peer_components(rule["to"], objects, dns=_ports(rule) == {53}):
            reached[comp] = _ports(rule)
        assert not _reaches(rule, METADATA) and not _reaches(rule, ipaddress.ip_address("8.8.8.8"))
    assert reached.pop("hub") == {8081}
    assert reached and all(k.startswith("dns:") and v == {53} for k, v in reached.items())
    assert any(
        8014 in _ports(r) and _peer_components(r["to"], objects) == {"sessions"} for r in policies["proxy"]["egress"]
    )


def test_sessions_disabled_brings_back_the_idle_culler(helm):
    objects = helm_template(helm, "--values", str(PRODUCTION), "--set", "sessions.enabled=false")
    for obj in objects:
        assert "sessions" not in obj["metadata"]["name"], obj["metadata"]["name"]
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "sessions", obj["metadata"][
            "name"
        ]
    keys = secret_data(objects)
    assert "sessions-api-token" not in keys and "culler-api-token" in keys
    env = container_env(objects, f"{RELEASE}-hub", OAUTH_SECRET)
    assert not [k for k in env if "SESSIONS" in k]
    assert env["WORKBENCH_CULLER_API_TOKEN"] == keys["culler-api-token"]
    policies = _policies(objects)
    assert "sessions" not in set().union(*(_peer_components(r["from"], objects) for r in policies["hub"]["ingress"]))
    assert all("sessions" not in _peer_components(r["to"], objects) for r in policies["proxy"]["egress"])
    settings = k8s_hub_settings(platform_policy(objects), env)
    hub = settings["JupyterHub"]
    assert [s["name"] for s in hub["services"]] == ["idle-culler", "dask-gateway", "quota", "rosters", "jobs"]
    assert [r for r in hub["load_roles"] if r.get("services") == ["idle-culler"]]
    assert not [r for r in hub["load_roles"] if r["name"] == "workbench-sessions"]
    assert SESSIONS_ACCESS_SCOPE not in settings["Spawner"]["server_token_scopes"]
    # the quota service's notifications still go through the proxy
    assert any(
        _peer_components(r["to"], objects) == {"proxy"} and _ports(r) == {8000}
        for r in policies["singleuser"]["egress"]
    )
    # no service at all: notebooks need not reach the proxy, and have no services URL
    bare = helm_template(
        helm,
        "--set",
        "sessions.enabled=false",
        "--set",
        "quota.enabled=false",
        "--set",
        "rosters.enabled=false",
        "--set",
        "jobs.enabled=false",
    )
    assert "WORKBENCH_SERVICES_URL" not in container_env(bare, f"{RELEASE}-hub")
    assert not any("proxy" in _peer_components(r["to"], bare) for r in _policies(bare)["singleuser"]["egress"])
