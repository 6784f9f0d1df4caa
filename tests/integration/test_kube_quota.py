"""Budgets and caps on the Kubernetes engine, against the real quota service: the same guarantees as embedded.

Real: a JupyterHub (it checks the tokens the quota service is called with), the quota service
(``python -m workbench.services.quota``, a hub-managed service; no reconcile with the hub and no stopping of
servers by itself, so every row change in these tests comes from the engine under test), its SQLite ledger,
a :class:`WorkbenchKubeSpawner` configured by :func:`workbench.kubernetes.hub.k8s_hub_settings` (KubeSpawner's
own ``start``/``stop``), the gateway's :class:`NamespacedKubeBackend` configured by
:func:`workbench.kubernetes.gateway.k8s_gateway_settings`, and the local spawner for the same refusals.

MOCKED, as no Kubernetes API server can run here: the Kubernetes API client (:class:`KubernetesApiMock`: the
CoreV1Api calls KubeSpawner makes and the pod watch it reads, the CustomObjectsApi calls the gateway backend
makes) and the DaskCluster watch (:class:`ClusterWatchMock`, fed what the API server would report).
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import yaml
from dask_gateway_server.backends.base import PublicException
from dask_gateway_server.models import User as GatewayUser
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from tornado import web
from traitlets.config import Config

from tests.quota_support import quota_policy_data

# imported here, not inside the test: pytest rewrites the module's asserts with ast.parse, which Debian's CPython
# 3.11.2 can fail with SystemError when called deep inside asyncio.run (tests/conftest.py)
from tests.unit.test_k8s_hub import HUB
from workbench.kubernetes.gateway import NamespacedKubeBackend, k8s_gateway_settings
from workbench.kubernetes.hub import k8s_hub_settings
from workbench.names import QUOTA_CUSTOM_SCOPES, QUOTA_WRITE_SCOPE
from workbench.policy import load_policy
from workbench.services.quota.ledger import Ledger
from workbench.spawn.kube import WorkbenchKubeSpawner, _offline_kube_config, _RenderHub, _RenderUser
from workbench.spawn.local import WorkbenchLocalSpawner

from .harness import free_port

pytestmark = pytest.mark.integration
NAMESPACE = "wb"
DASK = {
    "max_cores": 2,
    "max_memory": "4G",
    "max_workers": 2,
    "max_clusters": 1,
    "worker_max_cores": 1,
    "worker_max_memory": "1G",
}


# ---------------------------------------------------------------------------
# The real hub and quota service
# ---------------------------------------------------------------------------


def policy_data() -> dict:
    data = quota_policy_data()
    groups = data["groups"]
    # spent before the tests start (by an event, as the gateway would have sent it)
    groups["k8s-spent"] = {"kind": "research", "profiles": ["cpu-small"], "dask": DASK, "budget": {"cpu_hours": 10}}
    # spent while a cluster runs: stopped at once (no grace)
    groups["k8s-grace"] = {
        "kind": "research",
        "profiles": ["cpu-small"],
        "dask": DASK,
        "budget": {"cpu_hours": 10, "grace": "0s"},
    }
    return data


class QuotaHub:
    """A JupyterHub with the quota service as a managed service; the gateway's service token writes events."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.policy_path = tmp / "platform.yaml"
        self.policy_path.write_text(yaml.safe_dump(policy_data()))
        self.policy = load_policy(self.policy_path)
        self.port, self.hub_port, self.quota_port = free_port(), free_port(), free_port()
        self.quota_token, self.gateway_token = uuid.uuid4().hex, uuid.uuid4().hex
        self.db_url = f"sqlite:///{tmp / 'quota.sqlite'}"
        self.service_url = f"http://127.0.0.1:{self.quota_port}"
        self.api = f"{self.service_url}/services/quota/api"
        self.log = tmp / "hub.log"
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        quota_cmd = [
            sys.executable,
            "-m",
            "workbench.services.quota",
            f"--config={self.policy_path}",
            f"--db-url={self.db_url}",
            "--reconcile-every=0",
            "--enforce-every=0",
        ]
        return f"""
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.port}
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.JupyterHub.db_url = "sqlite:///{self.tmp / "hub.sqlite"}"
c.JupyterHub.cookie_secret = bytes.fromhex("{uuid.uuid4().hex * 2}")
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.custom_scopes = {QUOTA_CUSTOM_SCOPES!r}
c.JupyterHub.services = [
    {{"name": "quota", "url": "{self.service_url}", "api_token": "{self.quota_token}", "command": {quota_cmd!r}}},
    {{"name": "dask-gateway", "api_token": "{self.gateway_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "quota-service", "scopes": ["list:users", "read:users:name", "read:users:groups", "read:servers",
      {QUOTA_WRITE_SCOPE!r}], "services": ["quota"]}},
    {{"name": "quota-writers", "scopes": [{QUOTA_WRITE_SCOPE!r}], "services": ["dask-gateway"]}},
]
"""

    def start(self) -> QuotaHub:
        cfg = self.tmp / "jupyterhub_config.py"
        cfg.write_text(self.config())
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(cfg)],
                cwd=self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.api}/health", headers=self.writer, timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the quota service did not answer in 180s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    @property
    def writer(self) -> dict:
        return {"Authorization": f"token {self.gateway_token}"}

    def ledger(self) -> Ledger:
        return Ledger(self.db_url, self.policy, create=False)

    def open_rows(self, item: str) -> list:
        return [r for r in self.ledger().open_rows() if r.item == item]

    def closed_rows(self, item: str) -> list:
        return [r for r in self.ledger().rows() if r.item == item and r.stop is not None]

    def spend(self, group: str, user: str, *, cpu=0.0, gpu_count=0, gpu_type=None, seconds=60.0):
        """Usage the group already had: one closed interval ending a few seconds ago (as the gateway would send)."""
        stop = datetime.now(UTC) - timedelta(seconds=5)
        item = f"dask-worker:earlier/{uuid.uuid4().hex}"
        res = {"cpu": cpu, "gpu_count": gpu_count, **({"gpu_type": gpu_type} if gpu_type else {})}
        start = {"id": f"s-{item}", "type": "start", "item": item, "kind": "dask-worker", "user": user}
        events = [
            {**start, "group": group, "time": (stop - timedelta(seconds=seconds)).isoformat(), **res},
            {"id": f"e-{item}", "type": "stop", "item": item, "time": stop.isoformat()},
        ]
        r = requests.post(f"{self.api}/events", json={"events": events}, headers=self.writer, timeout=30)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def quota(tmp_path_factory):
    hub = QuotaHub(tmp_path_factory.mktemp("kube-quota")).start()
    yield hub
    hub.stop()


# ---------------------------------------------------------------------------
# The mocked Kubernetes API
# ---------------------------------------------------------------------------


class KubernetesApiMock:
    """MOCK of the Kubernetes API server (none can run here), as the clients see it.

    CoreV1Api for KubeSpawner: PVCs (none exist), pods (created pods run at once with an IP and ready
    containers, as the pod watch would then report them; deleted pods are gone). CustomObjectsApi for the
    gateway backend: DaskCluster objects created and patched. Every call is recorded in ``calls``.
    """

    def __init__(self):
        self.pods: dict[str, dict] = {}  # "namespace/name" -> pod, what the pod watch shows
        self.objects: dict[str, dict] = {}  # "namespace.name" -> DaskCluster
        self.calls: list[tuple[str, str]] = []

    # -- CoreV1Api -----------------------------------------------------------------
    async def read_namespaced_persistent_volume_claim(self, name, namespace, **kw):
        self.calls.append(("read_pvc", name))
        raise ApiException(status=404, reason="Not Found")

    async def create_namespaced_persistent_volume_claim(self, namespace, body, **kw):
        self.calls.append(("create_pvc", body.metadata.name))
        return body

    async def create_namespaced_pod(self, namespace, body, **kw):
        async with ApiClient() as client:
            pod = client.sanitize_for_serialization(body)
        name = pod["metadata"]["name"]
        self.calls.append(("create_pod", name))
        pod["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
        pod["status"] = {"phase": "Running", "podIP": "10.0.0.7", "containerStatuses": [{"ready": True}]}
        self.pods[f"{namespace}/{name}"] = pod
        return body

    async def delete_namespaced_pod(self, name, namespace, **kw):
        self.calls.append(("delete_pod", name))
        self.pods.pop(f"{namespace}/{name}", None)

    # -- CustomObjectsApi ----------------------------------------------------------
    async def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        obj = copy.deepcopy(body)
        name = obj["metadata"]["name"]
        self.calls.append(("create_daskcluster", name))
        obj["metadata"].update(namespace=namespace, creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        obj["status"] = {"phase": "Running"}  # what the controller reports once the scheduler runs
        self.objects[f"{namespace}.{name}"] = obj
        return obj

    async def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kw):
        self.calls.append(("patch_daskcluster", name))
        obj = self.objects[f"{namespace}.{name}"]
        for op in body:
            obj["spec"][op["path"].rsplit("/", 1)[1]] = op["value"]
        if obj["spec"].get("active") is False:
            obj["status"] = {"phase": "Stopped", "completionTime": obj["metadata"]["creationTimestamp"]}
        return obj


class PodWatchMock:
    """MOCK of KubeSpawner's pod reflector: the pods of :class:`KubernetesApiMock`, loaded at once."""

    def __init__(self, api: KubernetesApiMock):
        self.api = api
        self.first_load_future = asyncio.get_running_loop().create_future()
        self.first_load_future.set_result(None)

    @property
    def pods(self):
        return self.api.pods

    async def stop(self):
        pass


class ClusterWatchMock:
    """MOCK of the gateway backend's DaskCluster informer: the objects of :class:`KubernetesApiMock`."""

    def __init__(self, api: KubernetesApiMock):
        self.api = api

    def get(self, name):
        return self.api.objects.get(name)


# ---------------------------------------------------------------------------
# Notebook servers: WorkbenchKubeSpawner (and the local spawner's refusals)
# ---------------------------------------------------------------------------


def hub_env(quota: QuotaHub, service_url: str | None = None) -> dict:
    return {
        **HUB,
        "WORKBENCH_ALLOW_DEMO_AUTH": "true",
        "WORKBENCH_PLATFORM": str(quota.policy_path),
        "WORKBENCH_QUOTA_URL": service_url or quota.service_url,
        "WORKBENCH_QUOTA_API_TOKEN": quota.quota_token,
    }


class HubUser(_RenderUser):
    pass


async def kube_spawn(quota: QuotaHub, api: KubernetesApiMock, user: str, groups, profile, *, server="", env=None):
    """Start a WorkbenchKubeSpawner configured by k8s_hub_settings; returns it (started) or raises its HTTPError."""
    settings = k8s_hub_settings(quota.policy, env or hub_env(quota))
    config = Config({"WorkbenchKubeSpawner": settings["WorkbenchKubeSpawner"], "Spawner": settings["Spawner"]})
    config.WorkbenchKubeSpawner.gateway_api_url = ""  # no gateway here (clusters stopping with servers: elsewhere)
    with _offline_kube_config():
        spawner = WorkbenchKubeSpawner(user=HubUser(user, groups), hub=_RenderHub(), config=config)
    spawner.api = api  # MOCK: the Kubernetes API client
    if server:
        from types import SimpleNamespace

        spawner.orm_spawner = SimpleNamespace(name=server, server=None, user_options={})  # the ORM row has them
    spawner.user_options = {"profile": profile}
    spawner.events_enabled = False
    await asyncio.wait_for(spawner.start(), 60)
    return spawner


@pytest.fixture
def api(monkeypatch):
    """The Kubernetes API mock, with KubeSpawner's pod watch reading it."""
    mock = KubernetesApiMock()

    async def watch_pods(self, replace=False):  # MOCK: the pod watch of KubeSpawner
        key = self._get_reflector_key("pods")
        KubeSpawner.reflectors[key] = PodWatchMock(mock)
        return KubeSpawner.reflectors[key]

    monkeypatch.setattr(KubeSpawner, "_start_watching_pods", watch_pods)
    yield mock
    KubeSpawner.reflectors.clear()


def test_kube_spawner_admitted_creates_the_pod_and_a_ledger_row_then_stop_closes_it(quota, api):
    async def run():
        spawner = await kube_spawn(quota, api, "kube-ada", ["physics-lab"], "h100-x1")
        [row] = quota.open_rows("server:kube-ada/")
        assert [c for c in api.calls if c[0] == "create_pod"] == [("create_pod", spawner.pod_name)]
        assert (row.kind, row.group, row.profile, row.cpu, row.gpu_count, row.gpu_type) == (
            "server",
            "physics-lab",
            "h100-x1",
            8.0,
            1,
            "h100",
        )
        await spawner.stop()
        assert ("delete_pod", spawner.pod_name) in api.calls
        assert quota.open_rows("server:kube-ada/") == []
        [closed] = quota.closed_rows("server:kube-ada/")
        assert closed.id == row.id

    asyncio.run(run())


def local_refusal(quota: QuotaHub, user: str, groups, profile: str, server: str = "") -> web.HTTPError:
    """The local spawner's answer to the same start (refused before anything starts: no process, no account)."""
    from types import SimpleNamespace

    spawner = WorkbenchLocalSpawner(
        user=HubUser(user, groups),
        policy_path=str(quota.policy_path),
        quota_api_url=quota.api,
        quota_api_token=quota.quota_token,
        homes_root="/nonexistent-never-created",
    )
    if server:
        spawner.orm_spawner = SimpleNamespace(name=server, server=None, user_options={})  # the ORM row has them
    spawner.user_options = {"profile": profile}
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(spawner.start())
    assert not Path("/nonexistent-never-created").exists()
    return e.value


def test_kube_spawner_refuses_a_spent_budget_like_the_local_spawner_and_creates_nothing(quota, api):
    quota.spend("startup-acme", "kube-startup", gpu_count=1000, gpu_type="h100", seconds=360)  # 100 GPU-hours
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(kube_spawn(quota, api, "kube-startup", ["startup-acme"], "h100-x1"))
    assert e.value.status_code == 403
    assert "GPU budget of group startup-acme exhausted" in e.value.log_message
    assert api.calls == [] and quota.open_rows("server:kube-startup/") == []
    local = local_refusal(quota, "kube-startup", ["startup-acme"], "h100-x1")
    assert (local.status_code, local.log_message) == (403, e.value.log_message)


def test_kube_spawner_refuses_past_a_cap_like_the_local_spawner_and_creates_nothing(quota, api):
    async def first():
        return await kube_spawn(quota, api, "kube-bob", ["physics-lab"], "cpu-large")

    spawner = asyncio.run(first())  # physics-lab: user_running_servers 1
    created = list(api.calls)
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(kube_spawn(quota, api, "kube-bob", ["physics-lab"], "cpu-large", server="second"))
    assert e.value.status_code == 403
    assert e.value.log_message.startswith("User kube-bob in group physics-lab already runs 1 of at most 1 servers")
    assert api.calls == created  # nothing more: no PVC, no pod
    assert quota.open_rows("server:kube-bob/second") == []
    local = local_refusal(quota, "kube-bob", ["physics-lab"], "cpu-large", server="second")
    assert (local.status_code, local.log_message) == (403, e.value.log_message)
    asyncio.run(spawner.stop())


def test_kube_spawner_without_the_quota_service_refuses_with_503_and_creates_nothing(quota, api):
    env = hub_env(quota, service_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(kube_spawn(quota, api, "kube-cy", ["physics-lab"], "cpu-large", env=env))
    assert e.value.status_code == 503 and "try again in a minute" in e.value.log_message
    assert api.calls == []


# ---------------------------------------------------------------------------
# Dask clusters: the gateway's Kubernetes backend
# ---------------------------------------------------------------------------


def gateway_env(quota: QuotaHub, service_url: str | None = None) -> dict:
    return {
        "WORKBENCH_PLATFORM": str(quota.policy_path),
        "WORKBENCH_NAMESPACE": NAMESPACE,
        "WORKBENCH_GATEWAY_INSTANCE": "wb-gateway",
        "WORKBENCH_GATEWAY_API_URL": "http://wb-gateway-api.wb:8000/api",
        "WORKBENCH_HUB_API_URL": "http://wb-hub:8081/hub/api",
        "WORKBENCH_QUOTA_URL": service_url or quota.service_url,
        "JUPYTERHUB_API_TOKEN": quota.gateway_token,
    }


def kube_backend(quota: QuotaHub, api: KubernetesApiMock, service_url: str | None = None) -> NamespacedKubeBackend:
    """The backend as k8s_gateway_settings configures it, with the state its setup() would make, minus the API."""
    config = Config()
    for section, values in k8s_gateway_settings(quota.policy, gateway_env(quota, service_url)).items():
        for key, value in values.items():
            setattr(config[section], key, value)
    backend = NamespacedKubeBackend(config=config)
    assert backend.quota_api_url == f"{service_url or quota.service_url}/services/quota/api"
    backend.custom_client = api  # MOCK: the Kubernetes API client
    backend.informer = ClusterWatchMock(api)  # MOCK: the DaskCluster watch
    backend.clusters, backend.username_to_clusters = {}, defaultdict(dict)
    backend.cluster_waiters = defaultdict(asyncio.Event)
    return backend


def heartbeat(count: int) -> dict:
    return {"count": count, "active_workers": [], "closing_workers": [], "closed_workers": []}


def test_kube_cluster_admitted_then_workers_scaled_and_stopped_with_their_rows(quota):
    api = KubernetesApiMock()

    async def run():
        b = kube_backend(quota, api)
        name = await b.start_cluster(GatewayUser("kdask", groups=["physics-lab"]), {"worker_cores": 1})
        assert [c[0] for c in api.calls] == ["create_daskcluster"]
        [sched] = quota.open_rows(f"dask-scheduler:{name}")
        assert (sched.kind, sched.group, sched.cpu, sched.gpu_count) == ("dask-scheduler", "physics-lab", 1.0, 0)
        await b.sync_cluster(name)  # the watch sees the object
        await b.on_cluster_heartbeat(name, heartbeat(2))
        assert api.objects[name]["spec"]["replicas"] == 2
        workers = [r for r in quota.ledger().open_rows() if r.item.startswith(f"dask-worker:{name}/")]
        assert sorted(r.item for r in workers) == [f"dask-worker:{name}/0", f"dask-worker:{name}/1"]
        assert {(r.cpu, r.gpu_count) for r in workers} == {(1.0, 0)}
        await b.on_cluster_heartbeat(name, heartbeat(1))  # scaled down: the second slot's row is closed
        assert api.objects[name]["spec"]["replicas"] == 1
        assert quota.open_rows(f"dask-worker:{name}/1") == [] and quota.open_rows(f"dask-worker:{name}/0")
        await b.stop_cluster(name)
        assert api.objects[name]["spec"]["active"] is False
        for item in (f"dask-scheduler:{name}", f"dask-worker:{name}/0", f"dask-worker:{name}/1"):
            assert quota.open_rows(item) == [] and quota.closed_rows(item), item

    asyncio.run(run())


def test_kube_cluster_refused_by_a_spent_budget_creates_nothing(quota):
    quota.spend("k8s-spent", "kspent", cpu=700)  # 700 cores for a minute: more than 10 CPU-hours
    api = KubernetesApiMock()

    async def run():
        b = kube_backend(quota, api)
        with pytest.raises(PublicException, match="CPU budget of group k8s-spent exhausted"):
            await b.start_cluster(GatewayUser("kspent", groups=["k8s-spent"]), {})

    asyncio.run(run())
    assert api.calls == [] and not [r for r in quota.ledger().open_rows() if r.user == "kspent"]


def test_kube_cluster_max_clusters_through_the_shared_cap(quota):
    api = KubernetesApiMock()

    async def run():
        b = kube_backend(quota, api)
        user = GatewayUser("kcap", groups=["physics-lab"])  # physics-lab: max_clusters 2
        names = [await b.start_cluster(user, {}) for _ in range(2)]
        with pytest.raises(PublicException, match=r"already have 2 active Dask cluster\(s\).*max_clusters = 2"):
            await b.start_cluster(user, {})
        assert [c[0] for c in api.calls] == ["create_daskcluster"] * 2
        for n in names:
            await b.stop_cluster(n)

    asyncio.run(run())


def test_kube_cluster_without_the_quota_service_is_refused_and_nothing_created(quota):
    api = KubernetesApiMock()

    async def run():
        b = kube_backend(quota, api, service_url=f"http://127.0.0.1:{free_port()}")
        with pytest.raises(PublicException, match="does not answer"):
            await b.start_cluster(GatewayUser("kdown", groups=["physics-lab"]), {})

    asyncio.run(run())
    assert api.calls == []


def test_kube_workers_refused_once_the_budget_is_spent_and_the_cluster_stopped_by_enforcement(quota):
    api = KubernetesApiMock()

    async def run():
        b = kube_backend(quota, api)
        name = await b.start_cluster(GatewayUser("kgrace", groups=["k8s-grace"]), {})
        await b.sync_cluster(name)
        quota.spend("k8s-grace", "kgrace", cpu=700)  # the budget runs out while the cluster runs
        await b.on_cluster_heartbeat(name, heartbeat(2))
        assert api.objects[name]["spec"]["replicas"] == 0  # no worker slot admitted: no worker pod asked for
        assert not [r for r in quota.ledger().open_rows() if r.item.startswith(f"dask-worker:{name}/")]
        assert await b.quota_round() == [name]  # grace 0s: stopped now
        assert api.objects[name]["spec"]["active"] is False
        assert quota.open_rows(f"dask-scheduler:{name}") == [] and quota.closed_rows(f"dask-scheduler:{name}")

    asyncio.run(run())
