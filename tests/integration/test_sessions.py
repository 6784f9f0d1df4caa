"""The sessions service through a real embedded hub: session limits with warnings, per-profile idle
culling, idle-GPU culling (pretend GPUs whose utilisation a JSON file drives), notifications per user.

A test policy with limits of seconds and a check every second; nothing is mocked but the GPUs.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from .harness import Workbench, state_dir

pytestmark = pytest.mark.integration

POLICY = """
name: Sessions test
auth:
  type: demo
  demo_users:
    founder: {groups: [acme]}
    other: {groups: [acme]}
    ada: {groups: [lab]}
    bob: {groups: [lab]}
    gus: {groups: [lab]}
culling: {timeout: 1h, every: 1s, warn_before: [20s]}
gpu_types:
  h100: {display_name: NVIDIA H100}
images:
  base: {image: workbench/base:latest}
profiles:
  cpu-small: {cpu: 1, memory: 1G}
  cpu-idle: {cpu: 1, memory: 1G, idle_timeout: 45s}
  gpu-idle: {cpu: 1, memory: 1G, gpu: {type: h100}, idle_timeout: 20s}
  gpu-watch: {cpu: 1, memory: 1G, gpu: {type: h100}, gpu_idle_timeout: 10s}
groups:
  acme:
    kind: startup
    profiles: [cpu-small]
    session: {max_age: 40s}
    dask: {max_cores: 2, max_memory: 4G, max_workers: 1, max_clusters: 1, worker_max_cores: 1, worker_max_memory: 1G}
  lab:
    kind: research
    profiles: [cpu-idle, gpu-idle, gpu-watch]
"""

SESSION = 40
WARN = 20


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    config = tmp_path_factory.mktemp("sessions") / "platform.yaml"
    config.write_text(POLICY)
    w = Workbench(state_dir(), config=config, extra_args=("--fake-gpus", "h100:2")).start()
    yield w
    assert w.stop() == 0
    assert not w.leftovers(), w.leftovers()


def user_token(w: Workbench, name: str) -> str:
    return w.new_token(w.login(name), name)


def notifications(w: Workbench, token: str | None) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(f"{w.url}/services/sessions/api/notifications", headers=headers, timeout=30)


def hub_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def server_of(w: Workbench, token: str, name: str) -> dict | None:
    return w.token_api(token, "GET", f"/users/{name}").json().get("servers", {}).get("")


def wait_stopped(w: Workbench, token: str, name: str, timeout: float) -> float:
    """Waits until the server of ``name`` is gone; returns when (time.time())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_of(w, token, name) is None:
            return time.time()
        time.sleep(0.25)
    raise TimeoutError(f"the server of {name} still runs after {timeout}s:\n{w.hub_log()[-3000:]}")


def stop_if_running(w: Workbench, token: str, name: str) -> None:
    if server_of(w, token, name) is not None:
        w.stop_server(token, name)


def test_session_limit_warns_then_stops_the_server_and_its_dask_cluster(wb):
    token = user_token(wb, "founder")
    other = user_token(wb, "other")
    assert notifications(wb, None).status_code == 401
    try:
        server = wb.start_server(token, "founder", profile="cpu-small")
        started = hub_time(server["started"])
        with wb.gateway(token) as gw:
            cluster = gw.new_cluster(shutdown_on_close=False)  # ended by nothing but the server's stop
            assert [c.name for c in gw.list_clusters()] == [cluster.name]
            # the warning shows up before the stop, WARN seconds ahead
            deadline = time.monotonic() + SESSION + 30
            notes = []
            while time.monotonic() < deadline and not notes:
                r = notifications(wb, token)
                assert r.status_code == 200, r.text
                notes = r.json()["notifications"]
                time.sleep(0.25)
            warned = time.time()
            assert server_of(wb, token, "founder") is not None, "stopped before any warning"
            [note] = notes
            assert note["level"] == "critical" and note["source"] == "sessions" and note["server"] == ""
            assert "will be stopped in" in note["message"] and "session limit is 40s" in note["message"]
            assert started + SESSION - WARN - 1 <= hub_time(note["at"]) <= started + SESSION - WARN + 5
            assert warned < started + SESSION
            # only their own
            assert notifications(wb, other).json() == {"notifications": []}
            # stopped on time
            stopped = wait_stopped(wb, token, "founder", SESSION + 30)
            assert started + SESSION - 1 <= stopped <= started + SESSION + 10, (started, stopped)
            deadline = time.monotonic() + 30
            while gw.list_clusters() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert gw.list_clusters() == []
        notes = notifications(wb, token).json()["notifications"]
        assert [n["level"] for n in notes] == ["critical", "info"]
        assert "reached its session limit of 40s" in notes[1]["message"]
        assert "Stopped 1 Dask cluster(s) of founder with their server" in wb.hub_log()
    finally:
        stop_if_running(wb, token, "founder")


def test_cpu_and_gpu_servers_are_culled_at_their_own_idle_limits(wb):
    ada, bob = user_token(wb, "ada"), user_token(wb, "bob")
    try:
        cpu = wb.start_server(ada, "ada", profile="cpu-idle")
        gpu = wb.start_server(bob, "bob", profile="gpu-idle")
        gpu_stop = wait_stopped(wb, bob, "bob", 60)
        assert server_of(wb, ada, "ada") is not None, "the CPU server went with the GPU server's shorter limit"
        cpu_stop = wait_stopped(wb, ada, "ada", 60)
        # each at its own limit, counted from the hub's last_activity (no traffic reached either server)
        gpu_idle = hub_time(gpu["last_activity"]) + 20
        cpu_idle = hub_time(cpu["last_activity"]) + 45
        assert gpu_idle - 1 <= gpu_stop <= gpu_idle + 10, (gpu_idle, gpu_stop)
        assert cpu_idle - 1 <= cpu_stop <= cpu_idle + 10, (cpu_idle, cpu_stop)
        [note] = notifications(wb, bob).json()["notifications"]
        assert note["level"] == "info" and "without activity (the limit for gpu-idle is 20s)" in note["message"]
        [note] = notifications(wb, ada).json()["notifications"]
        assert "the limit for cpu-idle is 45s" in note["message"]
    finally:
        stop_if_running(wb, ada, "ada")
        stop_if_running(wb, bob, "bob")


def test_gpu_server_with_idle_gpus_is_culled_although_active(wb):
    util = Path(wb.state_dir, "fake-gpu-utilisation.json")
    util.write_text(json.dumps({"FAKE-h100-0": 90, "FAKE-h100-1": 90}))
    token = user_token(wb, "gus")
    stop = threading.Event()

    def keep_active():  # what a browser with a busy kernel does: fresh activity all the time
        while not stop.is_set():
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            wb.token_api(
                token,
                "POST",
                "/users/gus/activity",
                json={"last_activity": now, "servers": {"": {"last_activity": now}}},
            )
            stop.wait(1)

    t = threading.Thread(target=keep_active, daemon=True)
    try:
        wb.start_server(token, "gus", profile="gpu-watch")
        t.start()
        time.sleep(15)  # busy GPUs: longer than gpu_idle_timeout, and it keeps running
        server = server_of(wb, token, "gus")
        assert server is not None, "stopped although its GPUs were busy"
        assert time.time() - hub_time(server["last_activity"]) < 5  # the activity is fresh
        util.write_text(json.dumps({"FAKE-h100-0": 0, "FAKE-h100-1": 0}))
        idle_from = time.time()
        stopped = wait_stopped(wb, token, "gus", 40)
        assert idle_from + 10 - 1 <= stopped <= idle_from + 10 + 8, (idle_from, stopped)
        [note] = notifications(wb, token).json()["notifications"]
        assert "its GPUs were idle for" in note["message"] and "the limit for gpu-watch is 10s" in note["message"]
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        stop_if_running(wb, token, "gus")
