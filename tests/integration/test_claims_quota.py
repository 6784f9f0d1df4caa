"""README claims about crashes of the quota service and of the gateway, on the real embedded workbench.

One real `workbench up` (demo policy plus two small research groups, ``--quota-every 2``) is shared by the
module: real JupyterHub and proxy, real JupyterLab servers as per-user Unix accounts, the real
dask-gateway-server (local backend) and the real quota service. Nothing is mocked. The processes are killed
with SIGKILL the way ``test_quota_enforcement``'s hub test does: found among `workbench up`'s descendants by
their command line. JupyterHub restarts a managed service it finds dead at its next poll of the service
(``Spawner.poll_interval``, 30 s): that is how each service comes back here, as in production.

Fixtures (module): ``wb`` (the workbench), ``users`` (tokens, REST helpers, the ledger).

Claims (docs/claims.md):
- the quota service down: spawns and clusters refused with 503, nothing created; work resumes once it is back;
- a restart of the quota service during the grace period neither forgets nor restarts the grace;
- a kill -9 of the gateway loses no usage: the surviving cluster's rows stay open (no duplicate), are seen alive
  again after the restart, and close once when the cluster stops.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import psutil
import pytest
import requests
import yaml
from sqlalchemy.orm import Session

from workbench.policy import load_policy
from workbench.services.quota.ledger import Ledger, UsageRow, default_db_url
from workbench.sysusers import USER_PREFIX

from .harness import DEMO, Workbench, state_dir

pytestmark = pytest.mark.integration

#: seconds: longer than JupyterHub's poll of a managed service (30 s: `Spawner.poll_interval`'s default, which the
#: hub's `_ServiceSpawner` keeps, as it is made without the hub's config) plus the service's start on a loaded
#: machine (measured: reaped 21 s after the kill, healthy 1 s after that)
GRACE = 70
DOWN_USER = "qdown16"  # never started before this module: a refused start must leave no Unix account
DOWN_MESSAGE = "The quota service does not answer, so no server can start now; try again in a minute."
CLUSTER_DOWN_MESSAGE = "The quota service does not answer, so no Dask cluster can start now; try again in a minute."


def policy_data() -> dict:
    data = yaml.safe_load(DEMO.read_text())
    data["auth"]["demo_users"].update({DOWN_USER: {"groups": ["lab-down"]}, "graced": {"groups": ["lab-grace"]}})
    dask = {"max_cores": 2, "max_memory": "4G", "max_workers": 2, "max_clusters": 1, "worker_max_memory": "1G"}
    data["groups"]["lab-down"] = {"kind": "research", "profiles": ["cpu-small"], "dask": dask}
    data["groups"]["lab-grace"] = {
        "kind": "research",
        "profiles": ["cpu-small"],
        "budget": {"cpu_hours": 5, "period": "month", "grace": f"{GRACE}s"},
    }
    return data


def _drop_account(name: str) -> None:
    """Remove this module's own test account left by an earlier run (never another account)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def wb():
    _drop_account(f"{USER_PREFIX}{DOWN_USER}")
    sd = state_dir()
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data()))
    w = Workbench(sd, config=config, extra_args=("--quota-every", "2")).start()
    yield w
    assert w.stop() == 0, w.output()[-3000:]
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

    def notifications(self, user: str) -> list[dict]:
        r = requests.get(
            f"{self.quota}/notifications", headers={"Authorization": f"token {self.token(user)}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        return r.json()["notifications"]

    def group_used(self, user: str, group: str) -> float:
        r = requests.get(
            f"{self.quota}/usage/groups/{group}", headers={"Authorization": f"token {self.token(user)}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["cpu_hours"]

    def spend(self, group: str, user: str, cpu: float, seconds: float = 60) -> None:
        """Record usage the group already had: one closed interval ending a few seconds ago."""
        stop = datetime.now(UTC) - timedelta(seconds=5)
        item = f"dask-worker:earlier/{uuid.uuid4().hex}"
        events = [
            {
                "id": f"s-{item}",
                "type": "start",
                "item": item,
                "kind": "dask-worker",
                "user": user,
                "group": group,
                "time": (stop - timedelta(seconds=seconds)).isoformat(),
                "cpu": cpu,
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


def ledger(wb: Workbench) -> Ledger:
    return Ledger(default_db_url(wb.state_dir), load_policy(wb.config), create=False)


def open_rows_seen(led: Ledger, name: str) -> dict[str, tuple[int, datetime, datetime | None]]:
    """The open ledger rows of cluster ``name``: item -> (id, start, seen), ``seen`` being the last time a reconcile
    saw the item alive (the column the ledger closes a row at when the item is found dead)."""
    with Session(led.engine) as s:
        rows = s.query(UsageRow).filter(UsageRow.stop.is_(None), UsageRow.item.contains(name)).all()
        return {r.item: (r.id, r.start, r.seen) for r in rows}


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def service_process(wb: Workbench, marker: str) -> psutil.Process | None:
    """The live process of a hub-managed service whose command line contains ``marker``."""
    for p in wb.snapshot():
        if marker in _cmdline(p):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    return p
            except psutil.Error:
                continue
    return None


def kill_9(wb: Workbench, marker: str) -> psutil.Process:
    """SIGKILL the service process (a crash: no chance to clean up); returns it once it is dead.

    Dead, not gone: the hub reaps its service only at its next poll (``Spawner.poll_interval``, 30 s) and
    restarts it right then, so while :func:`unreaped` is true the service is certainly down and not yet
    restarted. Waiting for the pid to disappear would wait for that restart."""
    proc = service_process(wb, marker)
    assert proc is not None, f"no process of {marker} running"
    proc.kill()
    wait_for(lambda: not _alive(proc), 30, f"{marker} to die", every=0.05)
    return proc


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def unreaped(proc: psutil.Process) -> bool:
    """Whether the killed ``proc`` is still a zombie: the hub has not noticed, so it has not restarted it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_back(wb: Workbench, marker: str, health: str, old: psutil.Process, timeout: float = 180) -> psutil.Process:
    """Wait for JupyterHub to restart the service (a new process) and for its health to answer 200."""

    def back():
        proc = service_process(wb, marker)
        if proc is None or proc.pid == old.pid:
            return None
        try:
            ok = requests.get(f"{wb.url}{health}", timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        return proc if ok else None

    return wait_for(back, timeout, f"the hub to restart {marker}", every=1)


QUOTA = "workbench.services.quota"
GATEWAY = "dask-gateway-server"


def processes_of(wb: Workbench, user: str) -> list[str]:
    """Processes started by this workbench for ``user`` (servers by JUPYTERHUB_USER, Dask by their account)."""
    out = []
    for p in wb.snapshot():
        try:
            env = p.environ()
            owner = p.username()
        except psutil.Error:
            continue
        if env.get("JUPYTERHUB_USER") == user or owner == f"{USER_PREFIX}{user}":
            out.append(f"{p.pid} {owner} {_cmdline(p)[:100]}")
    return out


def test_quota_service_down_refuses_spawns_and_clusters_with_503_and_creates_nothing(wb, users):
    token = users.token(DOWN_USER)  # logging in needs no quota service
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{USER_PREFIX}{DOWN_USER}")  # precondition: the account does not exist yet

    killed = kill_9(wb, QUOTA)
    r = users.spawn(DOWN_USER)
    assert r.status_code == 503, r.text
    assert r.json()["message"] == DOWN_MESSAGE
    assert users.server(DOWN_USER) is None  # nothing running, nothing pending
    assert processes_of(wb, DOWN_USER) == []
    with pytest.raises(KeyError):  # no Unix side effect: the account is made only after the admission
        pwd.getpwnam(f"{USER_PREFIX}{DOWN_USER}")
    assert f"Refusing {DOWN_USER}'s start: the quota service at" in wb.hub_log()

    # a new cluster: the quota service is killed again if the hub restarted it meanwhile
    if service_process(wb, QUOTA) is not None:
        killed = kill_9(wb, QUOTA)
    with wb.gateway(token) as gw:
        # dask-gateway answers a refused request 422 with the message, which its client raises as ValueError
        # (a 503 would reach the user as "503, message='Service Unavailable'": its client drops the body)
        with pytest.raises(ValueError) as refused:
            gw.new_cluster()
        assert str(refused.value) == CLUSTER_DOWN_MESSAGE
        assert gw.list_clusters() == []
    if service_process(wb, QUOTA) is not None:
        killed = kill_9(wb, QUOTA)
    r = requests.post(
        f"{users.gw}/clusters/",
        json={"cluster_options": {}},
        headers={"Authorization": f"jupyterhub {token}"},
        timeout=60,
    )
    assert (r.status_code, r.json()) == (422, {"error": CLUSTER_DOWN_MESSAGE}), r.text
    assert processes_of(wb, DOWN_USER) == []  # no scheduler was started
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{USER_PREFIX}{DOWN_USER}")

    # JupyterHub restarts its managed service; then starts work again
    wait_back(wb, QUOTA, "/services/quota/api/health", killed)
    assert "Service quota exited with status -9" in wb.hub_log()
    assert users.spawn(DOWN_USER).status_code in (201, 202)
    wait_for(lambda: (users.server(DOWN_USER) or {}).get("ready"), 180, f"{DOWN_USER}'s server")
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster()
        try:
            assert [c.name for c in gw.list_clusters()] == [cluster.name]
        finally:
            cluster.shutdown()
    wb.stop_server(token, DOWN_USER)
    led = ledger(wb)
    wait_for(lambda: not led.open_rows(group="lab-down"), 60, "the rows of lab-down to close")
    kinds = sorted(r.kind for r in led.rows(group="lab-down"))
    assert kinds == ["dask-scheduler", "server"], kinds  # only what started after the service came back


def test_a_quota_service_restart_during_the_grace_neither_forgets_nor_restarts_it(wb, users):
    token = users.token("graced")
    assert users.spawn("graced").status_code in (201, 202)
    wait_for(lambda: (users.server("graced") or {}).get("ready"), 180, "graced's server")
    used = users.group_used("graced", "lab-grace")
    users.spend("lab-grace", "graced", cpu=(5 - used) * 60 + 0.1)  # a few core-seconds past the budget
    [note] = users.notifications("graced")
    assert note["level"] == "critical" and note["stops_at"], note
    deadline = datetime.fromisoformat(note["stops_at"])
    assert deadline > datetime.now(UTC) + timedelta(seconds=GRACE / 2), note  # the grace has just begun

    killed = kill_9(wb, QUOTA)
    wait_back(wb, QUOTA, "/services/quota/api/health", killed)
    assert datetime.now(UTC) < deadline, "the service came back after the grace: raise GRACE to test a restart in it"
    assert users.server("graced") is not None  # not stopped early by a service that forgot the grace
    [again] = users.notifications("graced")
    assert again["level"] == "critical", again
    after = datetime.fromisoformat(again["stops_at"])
    assert abs((after - deadline).total_seconds()) < 1, (note, again)  # the same deadline: not restarted

    wait_for(lambda: users.server("graced") is None, GRACE + 120, "the quota service to stop graced's server")
    led = ledger(wb)
    wait_for(lambda: not led.open_rows(group="lab-grace"), 60, "the server's row to close")
    [row] = [r for r in led.rows(group="lab-grace") if r.item == "server:graced/"]
    assert row.stop >= deadline, (row, deadline)  # stopped at the original deadline, not before
    assert users.spawn("graced").status_code == 403  # and the spent budget still refuses a new start
    assert users.server("graced") is None
    assert token  # the same user's token throughout


def test_a_gateway_kill_9_loses_no_usage_of_a_cluster_that_survives_it(wb, users):
    """The cluster runs on through the gateway's crash: its scheduler's and worker's rows stay open (the same rows,
    no duplicate), the restarted gateway's reconcile sees them alive again, and they close once when it stops."""
    token = users.token("researcher")
    led = ledger(wb)
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster()
        try:
            cluster.scale(1)
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=120)
            client.close()
            before = wait_for(
                lambda: (lambda o: o if len(o) == 2 else None)(open_rows_seen(led, cluster.name)), 60, "2 open rows"
            )
            killed_at = datetime.now(UTC)
            killed = kill_9(wb, GATEWAY)
            wait_back(wb, GATEWAY, "/services/dask-gateway/api/health", killed)
            back_at = datetime.now(UTC)

            def seen_again():
                rows = open_rows_seen(led, cluster.name)
                return (
                    rows if len(rows) == 2 and all(seen and seen >= back_at for _, _, seen in rows.values()) else None
                )

            after = wait_for(seen_again, 60, "the restarted gateway's reconcile to see the cluster alive")
            assert {i: r[:2] for i, r in after.items()} == {i: r[:2] for i, r in before.items()}  # the same rows
            assert [c.name for c in gw.list_clusters()] == [cluster.name]
        finally:
            cluster.shutdown()
    stopped_at = datetime.now(UTC)
    wait_for(lambda: not open_rows_seen(led, cluster.name), 60, "the cluster's rows to close")
    rows = [r for r in led.rows(group="physics-lab") if cluster.name in r.item]
    assert sorted(r.kind for r in rows) == ["dask-scheduler", "dask-worker"], rows  # one row each: no duplicate
    for r in rows:  # charged through the gateway's downtime (the cluster ran on), closed when it stopped
        assert r.start < killed_at and back_at < r.stop, r
        assert r.stop >= stopped_at - timedelta(seconds=1), (r, stopped_at)


def cluster_processes(wb: Workbench, name: str, role: str) -> list[psutil.Process]:
    """The local backend's processes of cluster ``name`` (its environment names it): ``role`` scheduler or worker."""
    out = []
    for p in wb.snapshot():
        try:
            if p.environ().get("DASK_GATEWAY_CLUSTER_NAME") == name and role in _cmdline(p):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_worker_that_dies_while_the_gateway_is_down_is_charged_until_it_was_last_seen(wb, users):
    """kill -9 the gateway, then the cluster's worker while no gateway runs: after the restart the worker's row is
    closed at the last time a reconcile saw it alive (before it died), never at the restart; the scheduler's row,
    alive throughout, stays open until the cluster stops."""
    token = users.token("researcher")
    led = ledger(wb)
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster()
        try:
            cluster.scale(1)
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=120)
            client.close()
            wait_for(lambda: len(open_rows_seen(led, cluster.name)) == 2, 60, "2 open rows")
            [worker_item] = [i for i in open_rows_seen(led, cluster.name) if i.startswith("dask-worker:")]
            killed = kill_9(wb, GATEWAY)
            workers = cluster_processes(wb, cluster.name, "worker")
            assert workers, "no worker process found"
            for p in workers:
                p.kill()
            # dead once a zombie: orphans of the killed gateway wait for a reaper (which may take its time)
            wait_for(lambda: not any(_alive(p) for p in workers), 30, "the worker to die", every=0.05)
            worker_died_at = datetime.now(UTC)
            wait_back(wb, GATEWAY, "/services/dask-gateway/api/health", killed)
            back_at = datetime.now(UTC)

            def worker_closed():
                return [r for r in led.rows(group="physics-lab") if r.item == worker_item and r.stop is not None]

            [row] = wait_for(worker_closed, 120, "the dead worker's row to close")
            assert row.stop <= worker_died_at < back_at, (row, worker_died_at, back_at)  # not through the downtime
            assert any(i.startswith("dask-scheduler:") for i in open_rows_seen(led, cluster.name))
        finally:
            cluster.shutdown()
    wait_for(lambda: not open_rows_seen(led, cluster.name), 60, "the cluster's rows to close")
