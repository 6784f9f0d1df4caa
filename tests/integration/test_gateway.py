"""Dask Gateway per group, through a real gateway behind a real hub (local backend, no mocks)."""

from __future__ import annotations

import base64
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from .harness import Workbench

pytestmark = pytest.mark.integration


@pytest.fixture
def wb(default_wb):
    """The shared default workbench (tests/integration/conftest.py)."""
    return default_wb


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
        spec = {
            f["field"]: f["spec"]
            for f in requests.get(f"{api(wb)}/options", headers=auth(token), timeout=30).json()["cluster_options"]
        }
        assert spec["worker_cores"]["max"] == 1 and spec["worker_memory"]["max"] == 0.93
        with pytest.raises(ValueError, match="worker_cores must be <= 1"):
            gw.new_cluster(worker_cores=2)
        r = requests.post(
            f"{api(wb)}/clusters/", headers=auth(token), timeout=30, json={"cluster_options": {"worker_memory": 64}}
        )
        assert r.status_code == 422 and "worker_memory must be <= 0.93" in r.text
        r = requests.post(
            f"{api(wb)}/clusters/",
            headers=auth(token),
            timeout=30,
            json={"cluster_options": {"environment": {"PATH": "/tmp/mine"}}},
        )
        assert r.status_code == 422 and "environment: PATH is set by the workbench" in r.text
        assert gw.list_clusters() == []


def test_scaling_beyond_max_workers_is_capped_with_a_message(wb):
    token = user_token(wb, "student1")  # max_workers 2
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(environment={"WB_COURSE_SEED": "42"})  # the user's own variables reach the workers
        try:
            with pytest.warns(UserWarning, match="exceed.*2 workers|limit"):
                cluster.scale(5)
            client = cluster.get_client()
            client.wait_for_workers(2, timeout=120)
            # the scheduler's target, which is all the gateway ever starts workers for, is the capped count
            # (so a third worker never gets its chance), and exactly the 2 are there
            targets = client.run_on_scheduler(
                lambda dask_scheduler: [
                    p.service.count for p in dask_scheduler.plugins.values() if hasattr(p, "service")
                ]
            )
            assert targets == [2], targets
            assert len(client.scheduler_info()["workers"]) == 2
            seen = client.run(
                lambda: (__import__("os").environ.get("WB_COURSE_SEED"), __import__("os").environ.get("PATH", ""))
            )
            assert all(seed == "42" and ".venv" in path for seed, path in seen.values()), seen
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
                # dask_gateway_server.routes: the cluster exists, so 403 "User startup lacks permissions ..."
                # (404 only for a name no cluster has)
                assert r.status_code == 403, (method, path, r.status_code)
                assert "User startup lacks permissions to" in r.json()["error"], (method, path, r.text)
            # the dashboard is behind the guard (workbench.gateway.dashguard): another user's token gets nothing
            dash = f"{wb.url}/services/dask-gateway/clusters/{name}/status"
            r = requests.get(dash, headers=auth(other), timeout=30, allow_redirects=False)
            # a valid token that may use the gateway, the gateway says 403 for this cluster: the guard answers 403
            assert r.status_code == 403, r.status_code
            assert "belongs to another user's cluster" in r.text, r.text
            assert gw.get_cluster(name).status.name == "RUNNING"  # untouched
        finally:
            cluster.shutdown()


def _guard_log(w: Workbench) -> str:
    """Everything the dashboard guard and the gateway logged (their files in the state folder)."""
    logs = w.state_dir / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")) if p.name != "hub.log")


def _ws_status(url: str, headers: dict) -> int:
    """HTTP status of a WebSocket handshake to ``url`` (101 when it would open)."""
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **headers,
    }
    with requests.get(url, headers=handshake, stream=True, timeout=30, allow_redirects=False) as r:
        return r.status_code


def test_dashboard_is_the_owners_only_by_token_and_by_browser(wb):
    owner = user_token(wb, "researcher")
    with wb.gateway(owner) as gw:
        cluster = gw.new_cluster()
        try:
            dash = f"{wb.url}/services/dask-gateway/clusters/{cluster.name}/status"

            # the owner's token (what the dask-gateway client sends) gets the Dask status page
            r = requests.get(dash, headers=auth(owner), timeout=30)
            assert r.status_code == 200, (r.status_code, r.text[:300])
            assert (
                "Dask Diagnostic UI" in r.text
            )  # the cluster's own Bokeh dashboard (bokeh comes with dask-labextension)
            assert requests.get(dash, headers={"Authorization": f"token {owner}"}, timeout=30).status_code == 200

            # no credentials: a page view goes to the hub's login (through its OAuth), an API call gets 401
            r = requests.get(dash, timeout=30, allow_redirects=False)
            assert r.status_code == 302 and r.headers["Location"].startswith("/hub/api/oauth2/authorize?")
            r = requests.get(dash, timeout=30)
            assert r.status_code == 200 and r.url.startswith(f"{wb.url}/hub/login"), r.url
            r = requests.post(dash, timeout=30, allow_redirects=False)
            # not a page view (only GET/HEAD are sent to log in): 401 (workbench.gateway.dashguard)
            assert r.status_code == 401, r.status_code
            r = requests.get(dash, headers=auth("not-a-token"), timeout=30, allow_redirects=False)
            assert r.status_code == 401, r.status_code

            # a browser logged in to the hub: through the OAuth flow, no consent page, to the page
            browser = wb.login("researcher")
            r = browser.get(dash, timeout=30)
            assert r.status_code == 200 and "Dask" in r.text, (r.status_code, r.url, r.text[:300])
            assert r.url == dash
            hops = [urlsplit(h.url).path for h in r.history]
            assert hops == [urlsplit(dash).path, "/hub/api/oauth2/authorize", "/services/dask-gateway/oauth_callback"]
            # then the guard's cookie alone does it
            r = browser.get(dash, timeout=30, allow_redirects=False)
            assert r.status_code == 200
            # the token behind that cookie carries the gateway's access scope (the gateway checks it too)
            tokens = wb.api(browser, "GET", "/users/researcher/tokens").json()["api_tokens"]
            mine = [t for t in tokens if t.get("oauth_client") == "JupyterHub service dask-gateway"]
            assert mine and all("access:services!service=dask-gateway" in t["scopes"] for t in mine), tokens

            # another user's browser, also logged in, gets 403
            intruder = wb.login("startup")
            r = intruder.get(dash, timeout=30)
            assert r.status_code == 403, (r.status_code, r.url)
            assert "belongs to another user's cluster" in r.text
            assert "Dask needs" not in r.text and "bokeh" not in r.text.lower()

            # WebSockets (the Bokeh dashboard's): refused to others before reaching the cluster; the owner's
            # handshake is passed on to the cluster's Bokeh server, which upgrades it (bokeh comes with
            # dask-labextension)
            ws = dash + "/ws"
            assert _ws_status(ws, auth(user_token(wb, "startup"))) == 403
            assert _ws_status(ws, {}) == 401
            assert _ws_status(ws, auth(owner)) == 101
            assert f"refused cluster {cluster.name} dashboard to researcher" not in wb.hub_log() + _guard_log(wb)
        finally:
            cluster.shutdown()


def test_stopping_the_notebook_server_stops_the_users_clusters(wb):
    token = user_token(wb, "startup")
    wb.start_server(token, "startup", profile="cpu-small")
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(shutdown_on_close=False)  # kept alive by nothing but the server
        assert [c.name for c in gw.list_clusters()] == [cluster.name]
        wb.stop_server(token, "startup")
        deadline = time.monotonic() + 120
        while gw.list_clusters() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gw.list_clusters() == []
    assert "Stopped 1 Dask cluster(s) of startup with their server" in wb.hub_log()


def _cmdline(p: psutil.Process) -> str:
    """A process's command line; "" for one that is gone or a zombie not yet reaped (earlier tests' processes)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


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
            gateway_proc = next(p for p in wb.snapshot() if "dask-gateway-server" in _cmdline(p))
            scheduler_pids = {p.pid for p in wb.snapshot() if "scheduler" in _cmdline(p)}
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
