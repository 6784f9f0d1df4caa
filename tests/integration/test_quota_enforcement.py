"""Budgets enforced end to end through the real embedded workbench: hub spawns and Dask Gateway clusters.

A real JupyterHub (its spawner asks the quota service before every start), a real dask-gateway-server
(it admits schedulers and workers, reconciles them with the ledger and stops clusters of spent
budgets) and the real quota service. Mocked: only the GPUs (`--fake-gpus`, pretend devices: these
machines have none). Usage that a group "already had" is written to the ledger as events with the
gateway's service token, as the gateway would send them: a minute of many cores or GPUs, so the test
does not depend on where in the month it runs.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
import yaml

from workbench.policy import load_policy
from workbench.services.quota.ledger import Ledger, default_db_url

from .harness import DEMO, Workbench, state_dir

pytestmark = pytest.mark.integration
UTC = UTC
CAPPED = [f"cap{i}" for i in range(1, 51)]  # 50 users spawning at once against a cap of 5
GRACE = 10  # seconds: budget.grace of lab-grace


def policy_data() -> dict:
    data = yaml.safe_load(DEMO.read_text())
    users = data["auth"]["demo_users"]
    users.update(
        {
            "spender": {"groups": ["lab-spent"]},
            "warned": {"groups": ["lab-grace"]},
            "warned2": {"groups": ["lab-grace"]},
        }
    )
    users.update({u: {"groups": ["capped"]} for u in CAPPED})
    dask = {
        "max_cores": 2,
        "max_memory": "4G",
        "max_workers": 2,
        "max_clusters": 1,
        "worker_max_cores": 1,
        "worker_max_memory": "1G",
    }
    groups = data["groups"]
    groups["startup-acme"]["budget"] = {"gpu_hours": 1, "period": "month"}
    groups["lab-spent"] = {
        "kind": "research",
        "profiles": ["cpu-small"],
        "dask": dask,
        "budget": {"cpu_hours": 10, "period": "month"},
    }
    groups["lab-grace"] = {
        "kind": "research",
        "profiles": ["cpu-small"],
        "dask": dask,
        "budget": {"cpu_hours": 5, "period": "month", "grace": f"{GRACE}s", "warn_at": [0.8, 0.95]},
    }
    groups["capped"] = {"kind": "research", "profiles": ["cpu-small"], "caps": {"running_servers": 5}}
    return data


@pytest.fixture(scope="module")
def wb():
    sd = state_dir()
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data()))
    # PRETEND GPUs (a mock of the GPU, which these machines lack)
    w = Workbench(sd, config=config, extra_args=("--fake-gpus", "h100:2", "--quota-every", "2")).start()
    yield w
    assert w.stop() == 0, w.output()
    assert not w.leftovers(), w.leftovers()


class Users:
    def __init__(self, wb: Workbench):
        self.wb = wb
        self.tokens: dict[str, str] = {}
        secrets = json.loads((wb.state_dir / "secrets.json").read_text())
        self.writer = {"Authorization": f"token {secrets['gateway_api_token']}"}
        self.quota = f"{wb.url}/services/quota/api"
        self.gw = f"{wb.url}/services/dask-gateway/api/v1"

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = self.wb.new_token(self.wb.login(user), user)
        return self.tokens[user]

    def spawn(self, user: str, **options) -> requests.Response:
        return self.wb.token_api(self.token(user), "POST", f"/users/{user}/server", json=options or None)

    def server(self, user: str) -> dict | None:
        return self.wb.token_api(self.token(user), "GET", f"/users/{user}").json().get("servers", {}).get("")

    def gateway(self, user: str, method: str, path: str, **kw) -> requests.Response:
        return requests.request(
            method, f"{self.gw}{path}", headers={"Authorization": f"jupyterhub {self.token(user)}"}, timeout=60, **kw
        )

    def usage(self, user: str, path: str) -> dict:
        r = requests.get(f"{self.quota}{path}", headers={"Authorization": f"token {self.token(user)}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def spend(
        self,
        group: str,
        user: str,
        *,
        cpu: float = 0,
        gpu_count: int = 0,
        gpu_type: str | None = None,
        seconds: float = 60,
    ) -> None:
        """Record usage the group already had: one closed minute ending a few seconds ago."""
        stop = datetime.now(UTC) - timedelta(seconds=5)
        start = stop - timedelta(seconds=seconds)
        item = f"dask-worker:earlier/{uuid.uuid4().hex}"
        res = {"cpu": cpu, "gpu_count": gpu_count, **({"gpu_type": gpu_type} if gpu_type else {})}
        events = [
            {
                "id": f"s-{item}",
                "type": "start",
                "item": item,
                "kind": "dask-worker",
                "user": user,
                "group": group,
                "time": start.isoformat(),
                **res,
            },
            {"id": f"e-{item}", "type": "stop", "item": item, "time": stop.isoformat()},
        ]
        r = requests.post(f"{self.quota}/events", json={"events": events}, headers=self.writer, timeout=30)
        assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == ["recorded", "recorded"], r.text


@pytest.fixture(scope="module")
def users(wb):
    return Users(wb)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_ready(users: Users, user: str) -> None:
    wait_for(lambda: (users.server(user) or {}).get("ready"), 120, f"{user}'s server")


def ledger(wb: Workbench) -> Ledger:
    return Ledger(default_db_url(wb.state_dir), load_policy(wb.config), create=False)


def test_a_gpu_server_run_becomes_one_row_with_its_gpu_seconds(wb, users):
    t0 = datetime.now(UTC)
    r = users.spawn("researcher", profile="h100-x1")
    assert r.status_code in (201, 202), r.text
    wait_ready(users, "researcher")
    # no pause: the row runs from the admission to the stop event, and the usage must be exactly its length
    wb.stop_server(users.token("researcher"), "researcher")
    t1 = datetime.now(UTC)
    rows = [r for r in ledger(wb).rows(group="physics-lab") if r.item == "server:researcher/"]
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row.kind, row.user, row.profile, row.gpu_type, row.gpu_count, row.cpu) == (
        "server",
        "researcher",
        "h100-x1",
        "h100",
        1,
        8.0,
    )
    assert t0 <= row.start < row.stop <= t1  # opened at admission, closed by the stop event
    doc = users.usage("researcher", "/usage/users/researcher")
    ran = (row.stop - row.start).total_seconds()
    assert ran > 0
    assert doc["by_kind"]["server"]["gpu_seconds"] == pytest.approx(ran, abs=0.01)
    assert doc["by_kind"]["server"]["gpu_hours_by_type"] == {"h100": pytest.approx(ran / 3600, abs=1e-5)}
    assert doc["running"]["servers"] == 0


def test_a_cluster_accounts_its_scheduler_and_workers_and_closes_them_at_shutdown(wb, users):
    r = users.gateway("researcher", "POST", "/clusters/", json={"cluster_options": {}})
    assert r.status_code == 201, r.text  # dask_gateway_server.routes.create_cluster
    name = r.json()["name"]
    try:
        assert users.gateway("researcher", "GET", f"/clusters/{name}?wait").json()["status"] == "RUNNING"
        assert users.gateway("researcher", "POST", f"/clusters/{name}/scale", json={"count": 2}).status_code == 200
        led = ledger(wb)

        def open_items():
            return {row.item: row for row in led.open_rows(group="physics-lab") if name in row.item}

        items = wait_for(
            lambda: (lambda o: o if len(o) == 3 else None)(open_items()), 90, "a scheduler and 2 workers in the ledger"
        )
        kinds = sorted(row.kind for row in items.values())
        assert kinds == ["dask-scheduler", "dask-worker", "dask-worker"]
        assert all(row.user == "researcher" and row.cpu == 1.0 for row in items.values())
    finally:
        users.gateway("researcher", "DELETE", f"/clusters/{name}")
    wait_for(lambda: not open_items(), 60, "the cluster's rows to close")
    closed = [row for row in ledger(wb).rows(group="physics-lab") if name in row.item]
    assert len(closed) == 3 and all(row.stop is not None for row in closed)


def test_spent_gpu_budget_refuses_gpu_spawns_with_what_how_much_and_when(wb, users):
    users.spend("startup-acme", "startup", gpu_count=120, gpu_type="h100")  # 2 GPU-hours of a 1 GPU-hour budget
    r = users.spawn("startup", profile="h100-x1")
    assert r.status_code == 403, r.text
    message = r.json()["message"]
    assert "GPU budget of group startup-acme exhausted" in message
    assert "2.0 of 1 GPU-hours used this month" in message
    assert "resets " in message and "-01 00:00 UTC" in message
    assert users.server("startup") is None  # nothing started, nothing pending
    assert not [row for row in ledger(wb).open_rows(group="startup-acme")]
    # the GPU budget does not hold back a CPU server
    assert users.spawn("startup", profile="cpu-small").status_code in (201, 202)
    wait_ready(users, "startup")
    wb.stop_server(users.token("startup"), "startup")


def test_spent_cpu_budget_refuses_cluster_creation_and_spawns(wb, users):
    users.spend("lab-spent", "spender", cpu=720)  # 12 CPU-hours of a 10 CPU-hour budget
    r = users.gateway("spender", "POST", "/clusters/", json={"cluster_options": {}})
    assert r.status_code >= 400, r.text
    assert "CPU budget of group lab-spent exhausted: 12.0 of 10 CPU-hours used this month" in r.text
    listed = users.gateway("spender", "GET", "/clusters/").json()
    assert listed == {}  # the refused cluster is not left running or pending
    r = users.spawn("spender")
    assert r.status_code == 403 and "CPU budget of group lab-spent exhausted" in r.json()["message"], r.text


def test_fifty_concurrent_spawns_against_a_cap_of_five_leave_exactly_five(wb, users):
    with ThreadPoolExecutor(8) as pool:  # log in and make tokens first (untimed)
        list(pool.map(users.token, CAPPED))
    with ThreadPoolExecutor(len(CAPPED)) as pool:
        codes = dict(zip(CAPPED, pool.map(lambda u: users.spawn(u), CAPPED)))

    def outcome(user: str) -> str:
        """201 started, 403 refused; 202 (still pending after the hub's slow_spawn_timeout, which a loaded machine
        reaches before the admission answers): wait until it runs (admitted) or is gone (refused)."""
        code = codes[user].status_code
        if code != 202:
            return {201: "started", 403: "refused"}.get(code, str(code))
        found = wait_for(lambda: (users.server(user) or {"ready": "gone"}).get("ready"), 180, f"{user}'s spawn")
        return "refused" if found == "gone" else "started"

    outcomes = {u: outcome(u) for u in CAPPED}
    allowed = [u for u, o in outcomes.items() if o == "started"]
    refused = [u for u, o in outcomes.items() if o == "refused"]
    assert len(allowed) == 5 and len(refused) == len(CAPPED) - 5, outcomes
    rows = ledger(wb).rows(group="capped")
    for u in refused:
        if codes[u].status_code == 403:
            assert "Group capped already runs 5 of at most 5 servers at once" in codes[u].json()["message"]
        assert users.server(u) is None  # nothing left pending
        assert not [r for r in rows if r.item == f"server:{u}/"], f"{u} was admitted"  # refused, not failed
    if any(codes[u].status_code == 202 for u in refused):
        assert "Group capped already runs 5 of at most 5 servers at once" in wb.hub_log()
    for u in allowed:
        wait_ready(users, u)
    assert len([row for row in ledger(wb).open_rows(group="capped") if row.kind == "server"]) == 5
    for u in allowed:
        wb.stop_server(users.token(u), u)
    assert users.spawn(refused[0]).status_code in (201, 202)  # a freed place can be taken
    wait_ready(users, refused[0])
    wb.stop_server(users.token(refused[0]), refused[0])
    assert not ledger(wb).open_rows(group="capped")


def test_warnings_then_servers_and_clusters_stop_after_the_grace(wb, users):
    assert users.spawn("warned").status_code in (201, 202)
    wait_ready(users, "warned")
    r = users.gateway("warned2", "POST", "/clusters/", json={"cluster_options": {}})
    assert r.status_code == 201, r.text  # dask_gateway_server.routes.create_cluster
    cluster = r.json()["name"]
    assert users.usage("warned", "/notifications")["notifications"] == []

    users.spend("lab-grace", "warned", cpu=255)  # 4.25 of 5 CPU-hours: 85%, past the first warning level
    notes = users.usage("warned", "/notifications")["notifications"]
    assert [n["level"] for n in notes] == ["warning"], notes
    assert "CPU budget of group lab-grace: 4.3 of 5 CPU-hours used this month (85%)" in notes[0]["message"]

    # spend the rest, a hair past the limit (0.06 core-seconds), so the budget runs out between the read of
    # `used` (not spent then) and the notification (spent)
    before_read = datetime.now(UTC)
    used = users.usage("warned", "/usage/groups/lab-grace")["usage"]["cpu_hours"]
    assert used < 5
    users.spend("lab-grace", "warned", cpu=(5 - used) * 60 + 0.001)
    note = users.usage("warned", "/notifications")["notifications"][0]
    after_note = datetime.now(UTC)
    assert note["level"] == "critical" and "exhausted" in note["message"] and note["stops_at"], note
    assert "stop at" in note["message"]
    stops_at = datetime.fromisoformat(note["stops_at"])
    # the deadline is GRACE after the budget ran out (workbench.services.quota.enforce.exhausted_since: the
    # overdraft over the group's burn rate, here the server and the scheduler that ran all along): not before
    # the read that found it unspent (1 s for the 6-decimal rounding of `used`), not after the notification
    grace = timedelta(seconds=GRACE)
    assert before_read + grace - timedelta(seconds=1) <= stops_at <= after_note + grace, (before_read, stops_at)

    wait_for(lambda: users.server("warned") is None, GRACE + 90, "the quota service to stop the server")
    # within the grace it kept running: the server's row (closed by the spawner's stop event) ends after the
    # deadline, and the stop came from the quota service's enforcement (its log line names the budget)
    [row] = [r for r in ledger(wb).rows(group="lab-grace") if r.item == "server:warned/"]
    assert row.stop is not None and row.stop >= stops_at, (row.stop, stops_at)
    assert "stopping server:warned/: " in wb.hub_log()

    def cluster_stopped():
        r = users.gateway("warned2", "GET", f"/clusters/{cluster}")
        return r.status_code == 404 or r.json().get("status") in ("STOPPED", "FAILED")

    wait_for(cluster_stopped, 60, "the gateway to stop the cluster of the spent budget")
    assert "Stopping cluster" in wb.hub_log() and "budget of group lab-grace is spent" in wb.hub_log()
    wait_for(lambda: not ledger(wb).open_rows(group="lab-grace"), 30, "the group's rows to close")


def test_a_hub_killed_mid_run_loses_no_usage_and_counts_none_twice(wb):
    """kill -9 the hub while a server runs; `workbench up` stops, and a new one on the same state folder finds the
    server gone: its one row is closed at the last time the server was known alive (the quota service's rounds
    and its exit heartbeat), so the time the platform was down is not charged; no duplicate row."""
    wb.stop()  # the module's workbench: this test needs one it can crash (same policy, same state folder)
    w = Workbench(wb.state_dir, config=wb.config, extra_args=wb.extra_args).start()
    users = Users(w)
    try:
        assert users.spawn("researcher", profile="cpu-large").status_code in (201, 202)
        wait_ready(users, "researcher")
        led = ledger(w)
        [before] = [r for r in led.open_rows(group="physics-lab") if r.item == "server:researcher/"]
        hub = next(p for p in w.snapshot() if any(part.endswith("/jupyterhub") for part in p.cmdline()))
        killed_at = datetime.now(UTC)
        hub.kill()
        assert w.proc.wait(120) != 0  # `workbench up` notices, stops what is left and fails
    finally:
        w.stop()
    assert not w.leftovers(), w.leftovers()

    restarted_at = datetime.now(UTC)
    again = Workbench(wb.state_dir, config=wb.config, extra_args=wb.extra_args).start()
    try:
        users = Users(again)
        wait_for(
            lambda: not [r for r in ledger(again).open_rows() if r.item == "server:researcher/"],
            180,  # the restarted hub's first reconcile; generous for a loaded machine (a clean CI run missed 60 s)
            "the dead server's row to close after the restart",
        )
        rows = [
            r
            for r in ledger(again).rows(group="physics-lab")
            if r.item == "server:researcher/" and r.start >= before.start
        ]
        assert len(rows) == 1 and rows[0].id == before.id and rows[0].start == before.start  # no duplicate
        # counted while it was known alive, never through the downtime until the restart
        assert before.start <= rows[0].stop < restarted_at, (rows[0], killed_at, restarted_at)
        assert users.spawn("researcher", profile="cpu-large").status_code in (201, 202)  # and on it goes
        wait_ready(users, "researcher")
        again.stop_server(users.token("researcher"), "researcher")
        rows = [
            r
            for r in ledger(again).rows(group="physics-lab")
            if r.item == "server:researcher/" and r.start >= before.start
        ]
        assert len(rows) == 2 and rows[1].start >= rows[0].stop  # the new run is a new row, after the old one
    finally:
        assert again.stop() == 0
    assert not again.leftovers(), again.leftovers()
