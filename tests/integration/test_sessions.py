"""The sessions service through a real embedded hub: session limits with warnings, per-profile idle
culling, idle-GPU culling (pretend GPUs whose utilisation a JSON file drives), notifications per user.

A test policy with limits of seconds and a check every second; nothing is mocked but the GPUs. Nothing is
timed by the test's clock: the hub's times (``started``, ``last_activity``) and the service's own (the ``at`` of
its notifications, its admin-only ``api/status``: when it checked which server and what it saw) are compared,
and "it keeps running" is asserted only after the service has checked the server past the limit.
"""

from __future__ import annotations

import json
import re
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
  admin_groups: [ops]
  demo_users:
    ops1: {groups: [ops]}
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
  ops:
    kind: admin
    profiles: [cpu-small]
"""

SESSION = 40
WARN = 20
GPU_IDLE = 10  # gpu-watch's gpu_idle_timeout


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


def sessions_status(w: Workbench, admin: str) -> dict:
    """The sessions service's record of its checks (``api/status``, hub admins only)."""
    r = requests.get(f"{w.url}/services/sessions/api/status", headers={"Authorization": f"token {admin}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def server_of(w: Workbench, token: str, name: str) -> dict | None:
    return w.token_api(token, "GET", f"/users/{name}").json().get("servers", {}).get("")


def wait_stopped(w: Workbench, token: str, name: str, timeout: float) -> None:
    """Waits until the server of ``name`` is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_of(w, token, name) is None:
            return
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

            # the warning shows up first, naming the time of the stop: the server's start + the limit
            def warned():
                r = notifications(wb, token)
                assert r.status_code == 200, r.text
                return r.json()["notifications"]

            [note] = wait_for(warned, SESSION + 60, "the session limit's warning")
            assert note["level"] == "critical" and note["source"] == "sessions" and note["server"] == ""
            assert "will be stopped in" in note["message"] and "session limit is 40s" in note["message"]
            [stops_at] = re.findall(r", at (\S+Z): ", note["message"])
            assert hub_time(stops_at) == pytest.approx(started + SESSION, abs=1e-3), note["message"]
            assert hub_time(note["at"]) >= started + SESSION - WARN  # not before the warning was due
            # only their own
            assert notifications(wb, other).json() == {"notifications": []}
            # stopped, at the limit and not before (the service's time of the stop, in its notification)
            wait_stopped(wb, token, "founder", SESSION + 90)
            deadline = time.monotonic() + 30
            while gw.list_clusters() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert gw.list_clusters() == []
        notes = notifications(wb, token).json()["notifications"]
        assert [n["level"] for n in notes] == ["critical", "info"]
        assert "reached its session limit of 40s" in notes[1]["message"]
        assert hub_time(notes[1]["at"]) >= started + SESSION
        assert "Stopped 1 Dask cluster(s) of founder with their server" in wb.hub_log()
    finally:
        stop_if_running(wb, token, "founder")


def test_cpu_and_gpu_servers_are_culled_at_their_own_idle_limits(wb):
    ada, bob = user_token(wb, "ada"), user_token(wb, "bob")
    try:
        cpu = wb.start_server(ada, "ada", profile="cpu-idle")
        gpu = wb.start_server(bob, "bob", profile="gpu-idle")
        wait_stopped(wb, bob, "bob", 90)
        wait_stopped(wb, ada, "ada", 90)
        # each at its own limit, counted from the hub's last_activity (no traffic reached either server): the
        # service's time of each stop (its notification) is past that server's own limit, the GPU one first
        [gpu_note] = notifications(wb, bob).json()["notifications"]
        assert gpu_note["level"] == "info"
        assert "without activity (the limit for gpu-idle is 20s)" in gpu_note["message"]
        [cpu_note] = notifications(wb, ada).json()["notifications"]
        assert "the limit for cpu-idle is 45s" in cpu_note["message"]
        assert hub_time(gpu_note["at"]) >= hub_time(gpu["last_activity"]) + 20
        assert hub_time(cpu_note["at"]) >= hub_time(cpu["last_activity"]) + 45
        assert hub_time(gpu_note["at"]) < hub_time(cpu_note["at"]), "the CPU server went with the GPU one's limit"
    finally:
        stop_if_running(wb, ada, "ada")
        stop_if_running(wb, bob, "bob")


def test_gpu_server_with_idle_gpus_is_culled_although_active(wb):
    util = Path(wb.state_dir, "fake-gpu-utilisation.json")
    util.write_text(json.dumps({"FAKE-h100-0": 90, "FAKE-h100-1": 90}))
    token = user_token(wb, "gus")
    admin = user_token(wb, "ops1")
    assert (
        requests.get(
            f"{wb.url}/services/sessions/api/status", headers={"Authorization": f"token {token}"}, timeout=30
        ).status_code
        == 403
    )  # the status names every user with a server: admins only
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

        # busy GPUs: wait until the service has checked the server over a stretch longer than gpu_idle_timeout
        def checked_past_the_limit():
            seen = sessions_status(wb, admin)["servers"].get("gus/")
            if seen and hub_time(seen["last_checked"]) > hub_time(seen["first_checked"]) + GPU_IDLE + 1:
                return seen
            return None

        seen = wait_for(checked_past_the_limit, 120, "the sessions service to check gus's server past 10s")
        assert seen["profile"] == "gpu-watch" and seen["checks"] >= 2, seen
        assert list(seen["gpu_utilisation"].values()) == [90.0], seen  # it sampled the busy GPU
        assert seen["gpu_idle_since"] is None and seen["last_action"] is None, seen
        server = server_of(wb, token, "gus")
        assert server is not None, "stopped although its GPUs were busy"
        # active all along: the hub's last_activity is newer than the service's first check of the server
        assert hub_time(server["last_activity"]) > hub_time(seen["first_checked"])

        util.write_text(json.dumps({"FAKE-h100-0": 0, "FAKE-h100-1": 0}))

        def idle_seen():
            return (sessions_status(wb, admin)["servers"].get("gus/") or {}).get("gpu_idle_since")

        idle_since = wait_for(idle_seen, 60, "the service to see the GPU idle")
        assert hub_time(idle_since) > hub_time(seen["last_checked"])  # idle from a check after the busy ones
        wait_stopped(wb, token, "gus", 90)
        [note] = notifications(wb, token).json()["notifications"]
        assert "its GPUs were idle for" in note["message"] and "the limit for gpu-watch is 10s" in note["message"]
        assert hub_time(note["at"]) >= hub_time(idle_since) + GPU_IDLE  # not before its idle stretch was over
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        stop_if_running(wb, token, "gus")
