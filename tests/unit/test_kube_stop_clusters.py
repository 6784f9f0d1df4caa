"""A user's Dask clusters stop with their default server on Kubernetes too (WorkbenchKubeSpawner.stop).

Real: WorkbenchKubeSpawner, its policy check, tornado's HTTP client talking to a small gateway API
served in this test (GET/DELETE /clusters/, what dask-gateway-server answers). Mocked, as the
Kubernetes API cannot run here: KubeSpawner.stop (deleting the pod) is replaced by a no-op.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubespawner import KubeSpawner
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from workbench.kubernetes.hub import k8s_hub_settings
from workbench.policy import load_policy
from workbench.spawn.kube import WorkbenchKubeSpawner, _offline_kube_config, _RenderHub, _RenderUser

DEMO = load_policy(Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml")


class User(_RenderUser):
    def __init__(self, name, groups):
        super().__init__(name, groups)
        self.tokens = []

    def new_api_token(self, scopes, expires_in, note):
        self.tokens.append((scopes, expires_in))
        return f"token-of-{self.name}"


class FakeGateway:
    """dask-gateway-server's cluster list and stop, recording who asked."""

    def __init__(self, clusters):
        self.clusters = dict(clusters)
        self.calls = []

    def app(self):
        gw = self

        class Clusters(web.RequestHandler):
            def get(self):
                gw.calls.append(("GET", None, self.request.headers.get("Authorization")))
                self.write(json.dumps(gw.clusters))

        class Cluster(web.RequestHandler):
            def delete(self, name):
                gw.calls.append(("DELETE", name, self.request.headers.get("Authorization")))
                gw.clusters.pop(name, None)
                self.set_status(204)

        return web.Application([(r"/api/v1/clusters/", Clusters), (r"/api/v1/clusters/([^/]+)", Cluster)])


async def stop_with(gateway: FakeGateway, user: User, server_name: str = "") -> None:
    [sock] = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(gateway.app())
    server.add_sockets([sock])
    try:
        with _offline_kube_config():
            spawner = WorkbenchKubeSpawner(
                policy=DEMO,
                user=user,
                hub=_RenderHub(),
                gateway_api_url=f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1",
            )
            if server_name:
                spawner.orm_spawner = SimpleNamespace(name=server_name, server=None)
            await spawner.stop()
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_kubernetes_api(monkeypatch):
    async def stop(self, now=False):  # MOCK: no Kubernetes API server here
        return None

    monkeypatch.setattr(KubeSpawner, "stop", stop)


def test_stopping_the_default_server_stops_the_users_clusters_with_a_gateway_only_token():
    gw, user = FakeGateway({"c1": {}, "c2": {}}), User("ada", ["physics-lab"])
    asyncio.run(stop_with(gw, user))
    assert gw.calls == [
        ("GET", None, "jupyterhub token-of-ada"),
        ("DELETE", "c1", "jupyterhub token-of-ada"),
        ("DELETE", "c2", "jupyterhub token-of-ada"),
    ]
    assert user.tokens == [(["access:services!service=dask-gateway"], 120)]  # short-lived, the gateway only


def test_named_servers_and_users_without_dask_leave_clusters_alone():
    gw = FakeGateway({"c1": {}})
    asyncio.run(stop_with(gw, User("ada", ["physics-lab"]), server_name="second"))
    asyncio.run(stop_with(gw, User("root", ["platform-admins"])))  # no dask section: no gateway call at all
    assert gw.calls == []


def test_a_gateway_that_does_not_answer_never_blocks_the_stop():
    user = User("ada", ["physics-lab"])

    async def run():
        with _offline_kube_config():
            spawner = WorkbenchKubeSpawner(
                policy=DEMO, user=user, hub=_RenderHub(), gateway_api_url="http://127.0.0.1:1/api/v1"
            )
            await spawner.stop()

    asyncio.run(run())  # logged, not raised


def test_the_kubernetes_hub_gives_the_spawner_the_gateway_api():
    from tests.unit.test_k8s_hub import HUB

    spawner = k8s_hub_settings(DEMO, {**HUB, "WORKBENCH_ALLOW_DEMO_AUTH": "true"})["WorkbenchKubeSpawner"]
    assert spawner["gateway_api_url"] == f"{HUB['WORKBENCH_GATEWAY_URL'].rstrip('/')}/services/dask-gateway/api/v1"
