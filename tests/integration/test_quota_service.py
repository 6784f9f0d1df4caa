"""The quota service as a real hub-managed service of the embedded workbench, on SQLite and on PostgreSQL.

`workbench up` runs it (``python -m workbench.services.quota``) with its own token and roles; the tests talk
to it through the hub's proxy at /services/quota with real hub tokens: the gateway's service token
sends events, users read usage. PostgreSQL comes from scripts/postgres-up.sh (Debian's packages);
each run gets a fresh database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.quota_support import (
    POLICY,
    admit_request,
    fresh_postgres_database,
    postgres_url,
    quota_policy_data,
    start,
    stop,
)
from workbench.services.quota.ledger import Ledger, default_db_url
from workbench.services.quota.models import UsageEvent

from .harness import Workbench

pytestmark = pytest.mark.integration
UTC = UTC


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request):
    """None for the default SQLite ledger in the state folder, else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL: run as root (scripts/postgres-up.sh) or set WORKBENCH_TEST_POSTGRES_URL")
    url, drop = fresh_postgres_database(base)
    yield url
    drop()


class Quota:
    """The quota service of one running workbench, through the hub's proxy."""

    def __init__(self, wb: Workbench, db_url: str | None):
        self.wb = wb
        self.api = f"{wb.url}/services/quota/api"
        self.secrets = json.loads((wb.state_dir / "secrets.json").read_text())
        self.gateway = {"Authorization": f"token {self.secrets['gateway_api_token']}"}
        self.db_url = db_url or default_db_url(wb.state_dir)
        self._tokens: dict[str, str] = {}

    def token(self, user: str) -> dict:
        if user not in self._tokens:
            self._tokens[user] = self.wb.new_token(self.wb.login(user), user)
        return {"Authorization": f"token {self._tokens[user]}"}

    def events(self, events, headers=None, **kw) -> requests.Response:
        body = {"events": [json.loads(e.model_dump_json(exclude_none=True)) for e in events]}
        return requests.post(
            f"{self.api}/events", json=body, headers=self.gateway if headers is None else headers, timeout=30, **kw
        )

    def get(self, path: str, user: str | None = None, headers=None) -> requests.Response:
        headers = headers if headers is not None else (self.token(user) if user else {})
        return requests.get(f"{self.api}{path}", headers=headers, timeout=30)

    def ledger(self) -> Ledger:
        return Ledger(self.db_url, POLICY, create=False)

    def process(self) -> psutil.Process:
        for p in self.wb.snapshot():
            try:
                if "workbench.services.quota" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                pass
        raise AssertionError("no quota service process")


@pytest.fixture(scope="module")
def quota(db_url):
    parent = Path(tempfile.mkdtemp(prefix="wb-quota-", dir="/tmp"))
    parent.chmod(0o711)
    config = parent / "platform.yaml"
    config.write_text(yaml.safe_dump(quota_policy_data()))
    env = {"WORKBENCH_QUOTA_DB_URL": db_url} if db_url else {}
    # --quota-every 3600: the gateway's reconcile (every 30 s by default) would close the rows of the items these
    # tests admit, which no real gateway runs (a CI run: the burst's GPU rows closed between the ledger check and
    # the next admission); the tests ask for the hub reconcile themselves
    wb = Workbench(parent / "state", config=config, env=env, extra_args=("--quota-every", "3600")).start()
    try:
        q = Quota(wb, db_url)
        deadline = time.monotonic() + 30
        while requests.get(f"{q.api}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "quota service not healthy"
            time.sleep(0.3)
        yield q
    finally:
        code = wb.stop()
    assert code == 0, wb.output()
    assert not wb.leftovers(), wb.leftovers()
    shutil.rmtree(parent, ignore_errors=True)  # kept when something failed, for its logs


def test_health_and_openapi(quota, db_url):
    assert quota.get("/health").json() == {"status": "ok"}  # no details without a token
    health = quota.get("/health", "admin").json()
    assert health["status"] == "ok"
    assert health["database"] == ("postgresql" if db_url else "sqlite")
    doc = quota.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/api/admit" in doc["paths"] and "/metrics" in doc["paths"]
    missing = quota.get("/nope")
    assert missing.status_code == 404 and "openapi.json" in missing.json()["message"]


def test_events_become_rows_with_gpu_seconds_and_replays_change_nothing(quota):
    run = uuid.uuid4().hex[:8]
    item = f"dask-worker:c-{run}/w1"
    evs = [
        start(item, gpu_type="h100", gpu_count=2, cpu=4, id=f"{run}-s", time=datetime(2025, 3, 31, 23, 0, tzinfo=UTC)),
        stop(item, id=f"{run}-e", time=datetime(2025, 4, 1, 1, 30, tzinfo=UTC)),
    ]
    r = quota.events(evs)
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["recorded", "recorded"]
    again = quota.events(evs)
    assert [x["status"] for x in again.json()["results"]] == ["duplicate", "duplicate"]

    march = quota.get("/usage/users/researcher?period=2025-03", "researcher").json()
    april = quota.get("/usage/users/researcher?period=2025-04", "researcher").json()
    assert march["usage"]["gpu_seconds"] == 2 * 3600 and march["usage"]["cpu_seconds"] == 4 * 3600
    assert april["usage"]["gpu_seconds"] == 2 * 5400
    assert april["by_group"]["physics-lab"]["gpu_hours_by_type"] == {"h100": 3.0}
    ledger = quota.ledger()
    try:
        rows = [r for r in ledger.rows() if r.item == item]
        assert len(rows) == 1 and rows[0].gpu_count == 2 and rows[0].stop is not None
    finally:
        ledger.close()

    # only tokens with the write scope may send events; a bad body names the field
    assert quota.events(evs, headers=quota.token("researcher")).status_code == 403
    assert quota.events(evs, headers={}).status_code == 401
    bad = requests.post(
        f"{quota.api}/events",
        headers=quota.gateway,
        timeout=10,
        json={"events": [{"id": "x", "type": "start", "item": "i", "kind": "laptop"}]},
    )
    assert bad.status_code == 400 and "events[0]" in bad.text


def test_200_concurrent_admissions_against_a_cap_of_five(quota):
    """physics-lab may hold 5 GPUs at once: 200 simultaneous 1-GPU Dask workers get exactly 5 (decided in the
    service's memory, committed in groups)."""
    run = uuid.uuid4().hex[:8]
    n = 200
    barrier = threading.Barrier(n)

    def admit(i):
        body = {
            "user": f"member{i}",
            "group": "physics-lab",
            "item": f"dask-worker:adm-{run}/{i}",
            "kind": "dask-worker",
            "cpu": 1,
            "memory": 10**9,
            "gpu_type": "h100",
            "gpu_count": 1,
        }
        barrier.wait()
        return requests.post(f"{quota.api}/admit", json=body, headers=quota.gateway, timeout=60)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(admit, range(n)))
    allowed = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 403]
    assert len(allowed) == 5 and len(refused) == n - 5, [a.status_code for a in answers]
    assert {a.json()["reason"] for a in refused} == {"running-gpus"}
    assert refused[0].json()["message"].startswith("Group physics-lab already runs 5 of at most 5 GPUs")
    ledger = quota.ledger()
    try:
        mine = [r for r in ledger.open_rows(group="physics-lab") if r.item.startswith(f"dask-worker:adm-{run}/")]
        assert len(mine) == 5
    finally:
        ledger.close()
    # the gateway stops them: the cap is free again for the next tests
    assert quota.events([stop(a.json()["item"]) for a in allowed]).status_code == 200


def _send_until_accepted(quota: Quota, ev, deadline: float) -> dict:
    """A sender's delivery loop: the same event (same id) again until the service answers."""
    while time.monotonic() < deadline:
        try:
            r = quota.events([ev])
            if r.status_code == 200:
                return r.json()["results"][0]
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"event {ev.id} not accepted before the deadline")


def test_kill_9_mid_run_loses_nothing_and_counts_nothing_twice(quota):
    run = uuid.uuid4().hex[:8]
    first = quota.process()
    sent: list = []
    results: list = []
    stop_flag = threading.Event()

    def sender():
        i = 0
        while not stop_flag.is_set() and i < 400:
            item = f"dask-worker:kill-{run}/{i}"
            evs = [start(item, gpu_type="h100-mig-1g", gpu_count=1, cpu=1, id=f"{run}-{i}-s")]
            if i % 2:  # odd workers stop again; even ones keep running across the crash
                evs.append(stop(item, id=f"{run}-{i}-e"))
            for ev in evs:
                sent.append(ev)
                results.append(_send_until_accepted(quota, ev, time.monotonic() + 90))
            i += 1
            time.sleep(0.02)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(results) < 30:  # mid-run: events are flowing (the sender's own count of accepted ones)
            assert time.monotonic() < deadline and thread.is_alive(), "no events accepted"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)  # mid-run: no chance to finish a request or a transaction
        psutil.wait_procs([first], timeout=10)
        deadline = time.monotonic() + 60  # the hub restarts its managed service (its service check runs every 30 s)
        while time.monotonic() < deadline:
            try:
                if quota.get("/health").status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the quota service did not come back")
        after_restart = len(results)
        deadline = time.monotonic() + 60
        while len(results) < after_restart + 20 and thread.is_alive():  # and flowing again after the restart
            assert time.monotonic() < deadline, "no events accepted after the restart"
            time.sleep(0.01)
    finally:
        stop_flag.set()
        thread.join(120)
    assert quota.process().pid != first.pid

    starts = [e for e in sent if e.type == "start"]
    stops = [e for e in sent if e.type == "stop"]
    assert len(starts) > 10
    # retries across the crash were answered "duplicate" when the first try had been committed
    assert {r["status"] for r in results} <= {"recorded", "duplicate"}
    ledger = quota.ledger()
    try:
        rows = [r for r in ledger.rows() if r.item.startswith(f"dask-worker:kill-{run}/")]
        by_item: dict = {}
        for r in rows:
            by_item.setdefault(r.item, []).append(r)
        assert all(len(v) == 1 for v in by_item.values()), "no duplicates"
        assert set(by_item) == {e.item for e in starts}, "no gaps: every start has its row"
        stopped = {e.item for e in stops}
        for item, [row] in by_item.items():
            assert (row.stop is not None) == (item in stopped), item
        still = [r for r in rows if r.stop is None]
        assert still, "some workers run across the crash"

        # running usage is still counted: the running rows keep growing
        def mig_hours() -> float:
            doc = quota.get("/usage/users/researcher", "researcher").json()
            return doc["usage"]["gpu_hours_by_type"]["h100-mig-1g"]

        before = mig_hours()
        deadline = time.monotonic() + 60
        while (after := mig_hours()) <= before:  # 6-decimal hours: it grows within a few seconds
            assert time.monotonic() < deadline, f"the running rows' usage stays at {before} GPU-hours"
            time.sleep(0.25)
        assert after > before
    finally:
        ledger.close()
    # the workers left running are stopped, so that the next test starts with the group's caps free
    r = quota.events([stop(r.item) for r in still])
    assert r.status_code == 200 and {x["status"] for x in r.json()["results"]} == {"recorded"}, r.text


def test_kill_9_mid_admission_burst_keeps_every_answered_admission_and_the_cap(quota):
    """Admissions are answered once their batch is committed: after a kill -9 of the service in the middle of a
    burst, every admission that got a 200 has its row, and the GPU cap (5) still holds after the restart."""
    run = uuid.uuid4().hex[:8]
    first = quota.process()
    answered: list[tuple[str, int]] = []  # (item, row) of each 200
    lock = threading.Lock()
    stop_flag = threading.Event()
    session = requests.Session()

    def sender(k: int):
        i = 0
        while not stop_flag.is_set():
            gpu = i % 10 == 0  # every tenth asks for a GPU: 5 fit, across the crash
            item = f"dask-worker:burst-{run}/{k}-{i}"
            body = {"user": f"member{k}", "group": "physics-lab", "item": item, "kind": "dask-worker", "cpu": 1}
            if gpu:
                body |= {"gpu_type": "h100", "gpu_count": 1}
            try:
                r = session.post(f"{quota.api}/admit", json=body, headers=quota.gateway, timeout=30)
            except requests.RequestException:
                time.sleep(0.05)
                continue
            if r.status_code == 200:
                with lock:
                    answered.append((item, r.json()["row"]))
            i += 1

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(16)]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < 100:  # mid-burst: answers are flowing
            assert time.monotonic() < deadline, "no admissions answered"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        psutil.wait_procs([first], timeout=10)
        deadline = time.monotonic() + 60  # the hub restarts its managed service
        while True:
            assert time.monotonic() < deadline, "the quota service did not come back"
            try:
                if quota.get("/health").status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        with lock:
            after_restart = len(answered)
        while len(answered) < after_restart + 50:  # and flowing again after the restart
            time.sleep(0.01)
    finally:
        stop_flag.set()
        for th in threads:
            th.join(60)
    assert quota.process().pid != first.pid
    ledger = quota.ledger()
    try:
        rows = {r.id: r for r in ledger.rows() if r.item.startswith(f"dask-worker:burst-{run}/")}
        for item, row in answered:
            assert row in rows and rows[row].item == item, f"{item} was admitted (row {row}) but is not in the ledger"
        assert len({item for item, _ in answered}) == len(answered)
        gpu_rows = [r for r in rows.values() if r.gpu_count and r.stop is None]
        assert len(gpu_rows) == 5, "exactly the cap, across the crash"
        more = requests.post(
            f"{quota.api}/admit",
            json={
                "user": "member0",
                "group": "physics-lab",
                "item": f"dask-worker:burst-{run}/after",
                "kind": "dask-worker",
                "gpu_type": "h100",
                "gpu_count": 1,
            },
            headers=quota.gateway,
            timeout=30,
        )
        assert more.status_code == 403 and more.json()["reason"] == "running-gpus"  # loaded from the ledger
    finally:
        ledger.close()
    assert quota.events([stop(r.item) for r in rows.values() if r.stop is None]).status_code == 200


def test_users_read_their_own_and_instructors_their_course(quota):
    for user in ("student1", "student2", "instructor", "admin", "researcher"):
        quota.token(user)  # log in once, so the hub knows each user and their groups
    assert quota.get("/usage/users/researcher", "researcher").status_code == 200
    denied = quota.get("/usage/users/student1", "researcher")
    assert denied.status_code == 403 and "may not read" in denied.json()["message"]
    assert quota.get("/usage/users/student2", "student1").status_code == 403
    assert quota.get("/usage/groups/course-ml101", "researcher").status_code == 403
    lab = quota.get("/usage/groups/physics-lab", "researcher").json()
    assert lab["by_user"] is None and lab["budgets"]  # totals and budgets, not colleagues
    assert quota.get("/usage", "researcher").status_code == 403

    course = quota.get("/usage/groups/course-ml101", "instructor").json()
    assert course["by_user"] is not None
    student = quota.get("/usage/users/student1", "instructor").json()
    assert student["limited_to_groups"] == ["course-ml101"]
    assert quota.get("/usage/users/researcher", "instructor").status_code == 403
    assert quota.get("/usage/groups/physics-lab", "instructor").status_code == 403

    assert quota.get("/usage/users/student1", "admin").status_code == 200
    overview = quota.get("/usage", "admin").json()
    assert set(POLICY.groups) <= set(overview["groups"])

    assert quota.get("/usage/users/researcher", headers={}).status_code == 401
    assert quota.get("/usage/users/researcher", headers={"Authorization": "token nope"}).status_code == 403
    # a token without access to the quota service
    s = quota.wb.login("researcher")
    narrow = quota.wb.new_token(s, "researcher", scopes=["read:users:name!user"])
    assert quota.get("/usage/users/researcher", headers={"Authorization": f"token {narrow}"}).status_code == 403


def test_metrics_parse(quota):
    quota.events(
        [
            start(
                f"dask-worker:m-{uuid.uuid4().hex[:6]}/1",
                gpu_type="h100",
                gpu_count=1,
                time=datetime(2025, 1, 1, tzinfo=UTC),
            ),
        ]
    )
    r = requests.get(f"{quota.wb.url}/services/quota/metrics", headers=quota.token("admin"), timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "workbench_quota_gpu_seconds",
        "workbench_quota_cpu_seconds",
        "workbench_quota_budget_limit_hours",
        "workbench_quota_budget_used_ratio",
        "workbench_quota_running_gpus",
        "workbench_quota_running_servers",
    ):
        assert name in families, sorted(families)
    gpu = [
        s
        for s in families["workbench_quota_gpu_seconds"].samples
        if s.labels == {"group": "physics-lab", "gpu_type": "h100", "kind": "dask-worker"}
    ]
    assert gpu and gpu[0].value > 0
    limits = {
        (s.labels["group"], s.labels["resource"]): s.value
        for s in families["workbench_quota_budget_limit_hours"].samples
    }
    assert limits[("physics-lab", "gpu")] == 500 and limits[("startup-acme", "gpu")] == 100
    assert (
        requests.get(
            f"{quota.wb.url}/services/quota/metrics", headers=quota.token("researcher"), timeout=30
        ).status_code
        == 403
    )


def test_servers_are_accounted_from_the_hub(quota):
    """The spawner's admission opens a server's row and its stop event closes it; the reconcile with the hub's
    active servers closes what a lost stop left open, and opens what a lost start missed."""
    headers = quota.token("startup")
    token = headers["Authorization"].split()[1]
    server = quota.wb.start_server(token, "startup", profile="cpu-small")
    admin = quota.token("admin")
    assert quota.get("/usage/users/startup", "startup").json()["running"]["servers"] == 1
    ledger = quota.ledger()
    try:
        [row] = [r for r in ledger.open_rows() if r.item == "server:startup/"]
        started = datetime.fromisoformat(server["started"].replace("Z", "+00:00"))
        assert (row.group, row.profile, row.cpu) == ("startup-acme", "cpu-small", 1.0)
        assert abs((row.start - started).total_seconds()) < 2  # admitted as the spawn began
        r = requests.post(f"{quota.api}/reconcile/hub", headers=admin, timeout=30)
        assert r.status_code == 200 and r.json()["opened"] == [] and r.json()["closed"] == [], r.text
        quota.wb.stop_server(token, "startup")
        [row] = [r for r in ledger.rows() if r.item == "server:startup/"]
        assert row.stop is not None and row.stop > row.start  # closed by the spawner's stop event

        # a server whose stop never reached the service (here: a start event with no stop, an hour ago)
        ghost = "server:startup/ghost"
        an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        assert (
            quota.events(
                [
                    UsageEvent(
                        id=f"ghost-{uuid.uuid4().hex}",
                        type="start",
                        item=ghost,
                        kind="server",
                        user="startup",
                        group="startup-acme",
                        profile="cpu-small",
                        time=an_hour_ago,
                    )
                ]
            ).status_code
            == 200
        )
        assert requests.post(f"{quota.api}/reconcile/hub", headers=admin, timeout=30).json()["closed"] == [ghost]
        [row] = [r for r in ledger.rows() if r.item == ghost]
        assert row.stop is not None
    finally:
        ledger.close()
    assert requests.post(f"{quota.api}/reconcile/hub", headers=quota.token("researcher"), timeout=30).status_code == 403


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ledger_admissions_are_atomic_across_pools(backend, tmp_path):
    """50 admissions from 50 threads over two connection pools (as two service replicas) against a cap of 5."""
    drop = None
    if backend == "sqlite":
        url = default_db_url(tmp_path)
    else:
        base = postgres_url()
        if base is None:
            pytest.skip("no PostgreSQL: run as root (scripts/postgres-up.sh) or set WORKBENCH_TEST_POSTGRES_URL")
        url, drop = fresh_postgres_database(base)
    ledgers = [Ledger(url, POLICY, pool_size=25) for _ in range(2)]
    try:
        barrier = threading.Barrier(50)

        def one(i):
            barrier.wait()
            return ledgers[i % 2].admit(
                f"student{i}", "course-ml101", admit_request(f"server:student{i}/", kind="server", profile="cpu-small")
            )

        with ThreadPoolExecutor(50) as pool:
            decisions = list(pool.map(one, range(50)))
        assert sum(d.allowed for d in decisions) == 5
        assert len(ledgers[1].open_rows(group="course-ml101")) == 5
        # replayed events and a second reconcile change nothing on this database either
        evs = [start(f"dask-worker:r/{i}", id=f"r{i}") for i in range(20)] + [
            stop(f"dask-worker:r/{i}", id=f"x{i}") for i in range(10)
        ]
        ledgers[0].record_many(evs)
        assert [r.status for r in ledgers[1].record_many(evs)] == ["duplicate"] * 30
        assert ledgers[0].counts()["rows"] == 25
        # budgets summed by this database agree with the pure accounting over the same rows
        from workbench.services.quota.accounting import budget_statuses

        now = datetime.now(UTC)
        ledgers[0].record_many(
            [
                start("dask-worker:b/1", gpu_type="h100", gpu_count=3, time=now.replace(day=1, hour=0)),
                stop("dask-worker:b/1", time=now.replace(day=1, hour=0) + (now - now.replace(day=1, hour=0)) / 3),
                start("dask-worker:b/2", gpu_type="h100", gpu_count=1, cpu=2.5, time=now.replace(day=1, hour=0)),
            ]
        )
        rows = ledgers[0].rows(group="physics-lab")
        budget = POLICY.groups["physics-lab"].budget
        pure = budget_statuses(
            budget, "physics-lab", rows, now, "researcher", [r for r in rows if r.user == "researcher"]
        )
        sql = ledgers[1].budgets("physics-lab", "researcher", now)
        assert [b.used_hours for b in sql] == pytest.approx([b.used_hours for b in pure], abs=1e-5)
    finally:
        for led in ledgers:
            led.close()
        if drop:
            drop()
