"""Dask Gateway per group, through a real gateway behind a real hub (local backend, no mocks)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from .harness import Workbench
from .test_embedded import state_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wb():
    w = Workbench(state_dir()).start()
    yield w
    assert w.stop() == 0
    assert not w.leftovers(), w.leftovers()


def api(w: Workbench) -> str:
    return f"{w.url}/services/dask-gateway/api/v1"


def auth(token: str) -> dict:
    return {"Authorization": f"jupyterhub {token}"}


def user_token(w: Workbench, name: str) -> str:
    return w.new_token(w.login(name), name)


def stop_all(w: Workbench, token: str) -> None:
    for name in requests.get(f"{api(w)}/clusters/", headers=auth(token), timeout=30).json():  # {name: model}
        requests.delete(f"{api(w)}/clusters/{name}", headers=auth(token), timeout=30)


def test_options_beyond_the_group_limits_are_refused_naming_the_option(wb):
    token = user_token(wb, "student1")  # course-ml101: worker_max_cores 1, worker_max_memory 1G
    with wb.gateway(token) as gw:
        spec = {f["field"]: f["spec"] for f in
                requests.get(f"{api(wb)}/options", headers=auth(token), timeout=30).json()["cluster_options"]}
        assert spec["worker_cores"]["max"] == 1 and spec["worker_memory"]["max"] == 0.93
        with pytest.raises(ValueError, match="worker_cores must be <= 1"):
            gw.new_cluster(worker_cores=2)
        r = requests.post(f"{api(wb)}/clusters/", headers=auth(token), timeout=30,
                          json={"cluster_options": {"worker_memory": 64}})
        assert r.status_code == 422 and "worker_memory must be <= 0.93" in r.text
        assert gw.list_clusters() == []


def test_scaling_beyond_max_workers_is_capped_with_a_message(wb):
    token = user_token(wb, "student1")  # max_workers 2
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster()
        try:
            with pytest.warns(UserWarning, match="exceed.*2 workers|limit"):
                cluster.scale(5)
            client = cluster.get_client()
            client.wait_for_workers(2, timeout=120)
            time.sleep(3)
            assert len(client.scheduler_info()["workers"]) == 2
            client.close()
        finally:
            cluster.shutdown()


def test_concurrent_new_cluster_calls_respect_max_clusters(wb):
    token = user_token(wb, "researcher")  # physics-lab: max_clusters 2
    try:
        def create(_):
            return requests.post(f"{api(wb)}/clusters/", headers=auth(token), json={"cluster_options": {}}, timeout=60)

        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(create, range(20)))
        created = [r for r in results if r.status_code == 201]
        refused = [r for r in results if r.status_code == 422]
        assert len(created) == 2, [r.status_code for r in results]
        assert len(refused) == 18
        assert "dask.max_clusters = 2" in refused[0].text
        listed = requests.get(f"{api(wb)}/clusters/", headers=auth(token), timeout=30).json()
        assert sorted(listed) == sorted(r.json()["name"] for r in created)
    finally:
        stop_all(wb, token)


def test_other_user_cannot_see_scale_stop_or_open_dashboard(wb):
    owner = user_token(wb, "researcher")
    other = user_token(wb, "startup")
    with wb.gateway(owner) as gw:
        cluster = gw.new_cluster()
        try:
            name = cluster.name
            assert requests.get(f"{api(wb)}/clusters/", headers=auth(other), timeout=30).json() == {}
            for method, path, body in [
                ("GET", f"/clusters/{name}", None),
                ("POST", f"/clusters/{name}/scale", {"count": 3}),
                ("POST", f"/clusters/{name}/adapt", {"minimum": 0, "maximum": 3}),
                ("DELETE", f"/clusters/{name}", None),
            ]:
                r = requests.request(method, f"{api(wb)}{path}", headers=auth(other), json=body, timeout=30)
                assert r.status_code in (403, 404), (method, path, r.status_code)
            # the dashboard is behind the hub and the gateway's auth: another user's token gets nothing
            dash = f"{wb.url}/services/dask-gateway/clusters/{name}/status"
            r = requests.get(dash, headers=auth(other), timeout=30, allow_redirects=False)
            assert r.status_code in (401, 403, 404), r.status_code
            assert gw.get_cluster(name).status.name == "RUNNING"  # untouched
        finally:
            cluster.shutdown()


def test_stopping_the_notebook_server_stops_the_users_clusters(wb):
    token = user_token(wb, "startup")
    wb.start_server(token, "startup", profile="cpu-small")
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(shutdown_on_close=False)  # kept alive by nothing but the server
        assert [c.name for c in gw.list_clusters()] == [cluster.name]
        wb.stop_server(token, "startup")
        deadline = time.monotonic() + 30
        while gw.list_clusters() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gw.list_clusters() == []
    assert "Stopped 1 Dask cluster(s) of startup with their server" in wb.hub_log()


def test_gateway_restart_keeps_running_clusters(wb):
    token = user_token(wb, "researcher")
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster()
        try:
            cluster.scale(1)
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=120)
            assert client.submit(sum, [1, 2, 3]).result() == 6
            client.close()
            gateway_proc = next(p for p in wb.snapshot() if "dask-gateway-server" in " ".join(p.cmdline()))
            scheduler_pids = {p.pid for p in wb.snapshot() if "scheduler" in " ".join(p.cmdline())}
            os.kill(gateway_proc.pid, signal.SIGKILL)  # a crash: no chance to stop its clusters
            psutil.wait_procs([gateway_proc], timeout=10)  # not our child: poll until it is gone
            # the hub restarts its managed service; the new gateway finds the cluster in its database
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{wb.url}/services/dask-gateway/api/health", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            else:
                pytest.fail("the gateway did not come back")
            assert all(psutil.pid_exists(pid) for pid in scheduler_pids), "scheduler survived the restart"
            assert [c.name for c in gw.list_clusters()] == [cluster.name]
            again = gw.connect(cluster.name)
            client = again.get_client()
            assert client.submit(sum, [4, 5]).result() == 9
            client.close()
        finally:
            cluster.shutdown()
