"""Notebook jobs on the embedded engine (no Slurm): a real `workbench up` (hub, proxy, quota service, jobs service
as root, local engine), jobs submitted with users' hub tokens and run as local processes of wb-<user>.

Nothing is mocked. The policy is hub_config/demo.yaml plus a budget on the course (so course-wide runs are charged
to it) and a research group `lab-budget` (user `spender`) whose CPU budget the test spends while a job runs,
with a 15 s grace. Usage a group "already had" is written to the ledger as events with the gateway's service
token, as in test_quota_enforcement.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta

import nbformat
import psutil
import pytest
import requests
import yaml

from workbench.sysusers import USER_PREFIX, system_username

from .harness import DEMO, Workbench, state_dir
from .jobs_notebook import put_dask_notebook, put_notebook

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as per-user accounts: needs root"),
]

GRACE = 15


def policy_data() -> dict:
    data = yaml.safe_load(DEMO.read_text())
    data["auth"]["demo_users"]["spender"] = {"groups": ["lab-budget"]}
    data["groups"]["course-ml101"]["budget"] = {"cpu_hours": 1000, "period": "month"}
    data["groups"]["lab-budget"] = {
        "kind": "research",
        "profiles": ["cpu-small"],
        "budget": {"cpu_hours": 5, "period": "month", "grace": f"{GRACE}s"},
    }
    return data


@pytest.fixture(scope="module")
def wb():
    sd = state_dir("wb-jobs-local-")
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data()))
    w = Workbench(sd, config=config).start()
    assert w.runtime.get("gateway_backend", "local") != "slurm"
    yield w
    w.stop()
    assert not w.leftovers(), w.leftovers()


class Api:
    def __init__(self, wb: Workbench):
        self.wb = wb
        self.tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = self.wb.new_token(self.wb.login(user), user)
        return self.tokens[user]

    def jobs(self, user: str, method: str = "GET", path: str = "", **kw) -> requests.Response:
        return requests.request(
            method,
            f"{self.wb.url}/services/jobs/api/jobs{path}",
            headers={"Authorization": f"token {self.token(user)}"},
            timeout=60,
            **kw,
        )

    def submit(self, user: str, **body) -> dict:
        r = self.jobs(user, "POST", json=body)
        assert r.status_code == 201, r.text
        return r.json()["jobs"][0]

    def wait(self, user: str, job_id: str, states, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        doc = None
        while time.monotonic() < deadline:
            doc = self.jobs(user, path=f"/{job_id}").json()
            if doc["state"] in states:
                return doc
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not {states}: {doc}\n{self.wb.hub_log()[-3000:]}")


@pytest.fixture(scope="module")
def api(wb):
    return Api(wb)


def ledger_rows(wb: Workbench, item: str) -> list[tuple]:
    with sqlite3.connect(wb.state_dir / "quota.sqlite") as db:
        return db.execute(
            "SELECT start, stop, cpu, group_name, kind FROM quota_usage WHERE item = ?", (item,)
        ).fetchall()


def closed_row(wb: Workbench, item: str, timeout: float = 60) -> tuple:
    deadline = time.monotonic() + timeout
    while not (rows := ledger_rows(wb, item)) or rows[0][1] is None:
        assert time.monotonic() < deadline, f"no closed ledger row for {item}: {rows}"
        time.sleep(1)
    assert len(rows) == 1, rows
    return rows[0]


def seconds(row: tuple) -> float:
    return datetime.fromisoformat(str(row[1])).timestamp() - datetime.fromisoformat(str(row[0])).timestamp()


def output_text(api: Api, user: str, job_id: str) -> str:
    r = api.jobs(user, path=f"/{job_id}/output")
    assert r.status_code == 200, r.text
    out = nbformat.reads(r.text, as_version=4)
    return "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))


def job_processes(job: dict) -> list[psutil.Process]:
    pid, _, _ = job["engine_id"].partition("@")
    try:
        p = psutil.Process(int(pid))
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def test_a_parameterised_notebook_runs_as_the_user_in_their_home_and_is_charged_its_run_time(wb, api):
    put_notebook("researcher")
    job = api.submit("researcher", notebook="calc.ipynb", profile="cpu-large", parameters={"n": 21, "sleep": 2})
    assert job["engine"] == "local"
    procs = job_processes(job)
    assert procs and {p.username() for p in procs} == {f"{USER_PREFIX}researcher"}, [
        (p.pid, p.username()) for p in procs
    ]
    done = api.wait("researcher", job["id"], ("completed", "failed"))
    assert done["state"] == "completed", api.jobs("researcher", path=f"/{job['id']}/log").text
    assert f"result 42 {USER_PREFIX}researcher" in output_text(api, "researcher", job["id"])
    home = pwd.getpwnam(f"{USER_PREFIX}researcher").pw_dir
    run_dir = os.path.join(home, "jobs", "calc", done["run"])
    assert done["folder"] == f"jobs/calc/{done['run']}"
    assert open(os.path.join(run_dir, "result.txt")).read() == "42"
    assert os.stat(os.path.join(run_dir, "calc.ipynb")).st_uid == pwd.getpwnam(f"{USER_PREFIX}researcher").pw_uid
    row = closed_row(wb, f"job:researcher/{job['id']}")
    assert row[2:] == (4.0, "physics-lab", "job")
    assert abs(seconds(row) - done["duration_seconds"]) < 1.5
    assert done["duration_seconds"] >= 2


def test_a_job_survives_its_users_server_stopping(wb, api):
    put_notebook("student1")
    token = api.token("student1")
    wb.start_server(token, "student1", profile="cpu-small")
    job = api.submit("student1", notebook="calc.ipynb", profile="cpu-small", parameters={"n": 5, "sleep": 20})
    api.wait("student1", job["id"], ("running",))
    wb.stop_server(token, "student1")
    assert job_processes(job), "the job died with the server"
    done = api.wait("student1", job["id"], ("completed", "failed", "cancelled"))
    assert done["state"] == "completed", api.jobs("student1", path=f"/{job['id']}/log").text
    assert f"result 10 {USER_PREFIX}student1" in output_text(api, "student1", job["id"])
    row = closed_row(wb, f"job:student1/{job['id']}")
    assert abs(seconds(row) - done["duration_seconds"]) < 1.5 and done["duration_seconds"] >= 20


def test_a_cancelled_job_stops_and_is_charged_what_it_ran_and_others_cannot_touch_it(wb, api):
    put_notebook("student2")
    job = api.submit("student2", notebook="calc.ipynb", profile="cpu-small", parameters={"sleep": 600})
    api.wait("student2", job["id"], ("running",))
    procs = job_processes(job)
    assert procs
    # another student neither sees nor cancels it
    assert api.jobs("student1", "DELETE", path=f"/{job['id']}").status_code == 404
    assert api.jobs("student1", path=f"/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in api.jobs("student1").json()["jobs"]]
    assert all(p.is_running() for p in procs)
    r = api.jobs("student2", "DELETE", path=f"/{job['id']}")
    assert r.status_code == 200, r.text
    done = api.wait("student2", job["id"], ("cancelled",))
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    row = closed_row(wb, f"job:student2/{job['id']}")
    assert abs(seconds(row) - done["duration_seconds"]) < 1.5 and done["duration_seconds"] < 300


def test_an_instructor_runs_a_notebook_for_each_student_charged_to_the_course(wb, api):
    for user in ("student1", "student2"):
        put_notebook(user)
        api.token(user)  # both have logged in (the hub's course group lists its students from their logins)
    r = api.jobs("student1", "POST", json={"notebook": "calc.ipynb", "profile": "cpu-small", "course": "course-ml101"})
    assert r.status_code == 403 and "only instructors of course-ml101" in r.json()["message"], r.text
    r = api.jobs(
        "instructor",
        "POST",
        json={"notebook": "calc.ipynb", "profile": "cpu-small", "parameters": {"n": 3}, "course": "course-ml101"},
    )
    assert r.status_code == 201, r.text
    made = r.json()["jobs"]
    assert sorted(j["user"] for j in made) == ["student1", "student2"]
    assert {j["submitter"] for j in made} == {"instructor"} and {j["group"] for j in made} == {"course-ml101"}
    for j in made:
        done = api.wait("instructor", j["id"], ("completed", "failed"))
        assert done["state"] == "completed", api.jobs("instructor", path=f"/{j['id']}/log").text
        # run as the student, in the student's home
        assert f"result 6 {USER_PREFIX}{j['user']}" in output_text(api, j["user"], j["id"])
        home = pwd.getpwnam(f"{USER_PREFIX}{j['user']}").pw_dir
        assert open(os.path.join(home, done["folder"], "result.txt")).read() == "6"
        row = closed_row(wb, f"job:{j['user']}/{j['id']}")
        assert row[3] == "course-ml101" and abs(seconds(row) - done["duration_seconds"]) < 1.5
    # each student sees their own job only; the instructor sees both
    by = {j["user"]: j["id"] for j in made}
    for student, other in (("student1", "student2"), ("student2", "student1")):
        seen = [j["id"] for j in api.jobs(student).json()["jobs"]]
        assert by[student] in seen and by[other] not in seen
        assert api.jobs(student, path=f"/{by[other]}").status_code == 404
        assert api.jobs(student, path=f"/{by[other]}/output").status_code == 404
    seen = [j["id"] for j in api.jobs("instructor").json()["jobs"]]
    assert set(by.values()) <= set(seen)


def tagged_clusters(gw, job_id: str) -> list[str]:
    """Names of the gateway's clusters (of ``gw``'s user) tagged with the notebook job ``job_id``."""
    return [c.name for c in gw.list_clusters() if (c.options or {}).get("workbench_job") == f"job-{job_id}"]


def run_file(wb: Workbench, user: str, run: str, name: str, notebook: str = "dask_job") -> str:
    home = pwd.getpwnam(system_username(user)).pw_dir
    with open(os.path.join(home, "jobs", notebook, run, name)) as f:
        return f.read()


def test_the_jobs_service_gets_no_more_than_a_users_own_rights_in_a_token(wb, api):
    """The jobs service's role holds ``tokens!group=<policy group>`` (to mint a run's gateway token): the hub
    refuses a token with a scope its user lacks; the gateway token it gets holds that scope only and dies when
    deleted."""
    from workbench.names import GATEWAY_ACCESS_SCOPE

    service = json.loads((wb.state_dir / "secrets.json").read_text())["jobs_api_token"]
    api.token("student1")  # the user exists in the hub
    r = wb.token_api(service, "POST", "/users/student1/tokens", json={"scopes": ["admin:users"], "expires_in": 60})
    assert r.status_code == 400 and "admin:users" in r.text, r.text
    r = wb.token_api(
        service, "POST", "/users/student1/tokens", json={"scopes": [GATEWAY_ACCESS_SCOPE], "expires_in": 60}
    )
    assert r.status_code == 201, r.text
    model = r.json()
    identity = {"read:users:name!user=student1", "read:users:groups!user=student1"}  # every token's own
    assert set(model["scopes"]) - identity == {GATEWAY_ACCESS_SCOPE}, model["scopes"]
    assert wb.token_api(service, "DELETE", f"/users/student1/tokens/{model['id']}").status_code == 204
    assert wb.token_api(model["token"], "GET", "/user").status_code == 403


def test_a_job_uses_dask_gateway_as_its_user_and_only_its_own_clusters_stop_when_it_ends(wb, api):
    """The job's notebook calls ``Gateway()`` with no arguments (the job's environment), computes 41 + 1 on a
    worker, and its cluster is stopped when it ends; a cluster researcher started meanwhile from outside the job
    (as from their server) survives; the run's token holds only the gateway scope and is refused after the end;
    student1's gateway token cannot stop researcher's cluster."""
    from workbench.names import GATEWAY_ACCESS_SCOPE

    put_dask_notebook("researcher")
    with wb.gateway(api.token("researcher")) as gw:
        own = gw.new_cluster()
        try:
            job = api.submit("researcher", notebook="dask_job.ipynb", profile="cpu-large", parameters={"hold": 5})
            seen: set[str] = set()
            checked = False
            deadline = time.monotonic() + 400
            while (doc := api.jobs("researcher", path=f"/{job['id']}").json())["state"] not in FINAL:
                assert time.monotonic() < deadline, doc
                seen.update(tagged_clusters(gw, job["id"]))
                if seen and not checked:
                    checked = True
                    token = run_file(wb, "researcher", job["run"], "token.txt")
                    model = wb.token_api(token, "GET", "/user").json()
                    own_identity = ("read:users:name!user=researcher", "read:users:groups!user=researcher")
                    assert set(model["scopes"]) - set(own_identity) == {GATEWAY_ACCESS_SCOPE}, model
                    assert wb.token_api(token, "POST", "/users/researcher/server").status_code == 403
                    assert wb.token_api(token, "POST", "/users/researcher/tokens", json={}).status_code == 403
                    s1 = wb.new_token(wb.login("student1"), "student1", scopes=[GATEWAY_ACCESS_SCOPE])
                    with wb.gateway(s1) as gw1:
                        assert not gw1.list_clusters()  # researcher's clusters are not student1's to see
                        with contextlib.suppress(Exception):  # refused, or ignored: not student1's cluster
                            gw1.stop_cluster(own.name)
                    assert own.name in [c.name for c in gw.list_clusters()]
                time.sleep(1)
            assert doc["state"] == "completed", api.jobs("researcher", path=f"/{job['id']}/log").text
            assert run_file(wb, "researcher", doc["run"], "result.txt") == "42"
            assert seen, "the job's cluster was never listed with its tag"
            deadline = time.monotonic() + 120
            while tagged_clusters(gw, job["id"]):
                assert time.monotonic() < deadline, "the job's cluster outlived the job"
                time.sleep(1)
            assert own.name in [c.name for c in gw.list_clusters()], "a cluster not of the job was stopped"
            for name in seen:
                closed_row(wb, f"dask-scheduler:{name}", timeout=120)
            token = run_file(wb, "researcher", doc["run"], "token.txt")
            deadline = time.monotonic() + 60
            while wb.token_api(token, "GET", "/user").status_code == 200:
                assert time.monotonic() < deadline, "the run's token still works after the run"
                time.sleep(1)
            assert wb.token_api(token, "GET", "/user").status_code in (401, 403)
        finally:
            own.shutdown()


def test_a_job_cancelled_while_its_cluster_runs_leaves_no_cluster(wb, api):
    put_dask_notebook("researcher")
    with wb.gateway(api.token("researcher")) as gw:
        job = api.submit("researcher", notebook="dask_job.ipynb", profile="cpu-large", parameters={"hold": 600})
        deadline = time.monotonic() + 400
        while not os.path.exists(
            os.path.join(
                pwd.getpwnam(system_username("researcher")).pw_dir, "jobs", "dask_job", job["run"], "result.txt"
            )
        ):
            assert time.monotonic() < deadline, api.jobs("researcher", path=f"/{job['id']}/log").text
            time.sleep(1)
        names = tagged_clusters(gw, job["id"])
        assert names
        r = api.jobs("researcher", "DELETE", path=f"/{job['id']}")
        assert r.status_code == 200, r.text
        api.wait("researcher", job["id"], ("cancelled",))
        deadline = time.monotonic() + 120
        while tagged_clusters(gw, job["id"]):
            assert time.monotonic() < deadline, "the cancelled job's cluster is still running"
            time.sleep(1)
        for name in names:
            closed_row(wb, f"dask-scheduler:{name}", timeout=120)


FINAL = ("completed", "failed", "cancelled", "timeout")


def spend(wb: Workbench, group: str, user: str, cpu: float, secs: float = 60) -> None:
    """Record usage the group already had: one closed interval ending a few seconds ago."""
    token = json.loads((wb.state_dir / "secrets.json").read_text())["gateway_api_token"]
    stop = datetime.now(UTC) - timedelta(seconds=5)
    start = stop - timedelta(seconds=secs)
    item = f"dask-worker:earlier/{uuid.uuid4().hex}"
    events = [
        {
            "id": f"s-{item}",
            "type": "start",
            "item": item,
            "kind": "dask-worker",
            "user": user,
            "group": group,
            "time": start.isoformat(),
            "cpu": cpu,
            "gpu_count": 0,
        },
        {"id": f"e-{item}", "type": "stop", "item": item, "time": stop.isoformat()},
    ]
    r = requests.post(
        f"{wb.url}/services/quota/api/events",
        json={"events": events},
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == ["recorded", "recorded"], r.text


def test_a_job_whose_budget_runs_out_is_cancelled_and_charged_only_what_it_ran(wb, api):
    put_notebook("spender")
    job = api.submit("spender", notebook="calc.ipynb", profile="cpu-small", parameters={"sleep": 600})
    api.wait("spender", job["id"], ("running",))
    item = f"job:spender/{job['id']}"
    deadline = time.monotonic() + 60
    while not ledger_rows(wb, item):  # the run's row is open: it draws on the budget
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = requests.get(
        f"{wb.url}/services/quota/api/usage/groups/lab-budget",
        headers={"Authorization": f"token {api.token('spender')}"},
        timeout=30,
    )
    used = r.json()["usage"]["cpu_hours"]
    spend(wb, "lab-budget", "spender", cpu=(5 - used) * 60 + 0.01)  # spent, a core-second past the limit, now
    spent_at = time.time()
    done = api.wait("spender", job["id"], ("cancelled", "completed", "failed"), timeout=120)
    assert done["state"] == "cancelled" and done["reason"].startswith("budget:"), done
    assert "budget of group lab-budget is spent" in done["reason"]
    assert not job_processes(job) or all(p.status() == psutil.STATUS_ZOMBIE for p in job_processes(job))
    row = closed_row(wb, item)
    ended = datetime.fromisoformat(str(row[1])).timestamp()
    assert ended >= spent_at + GRACE - 4  # it ran on through the grace (ran out ~1 s before spent_at)
    assert abs(seconds(row) - done["duration_seconds"]) < 1.5 and done["duration_seconds"] < 300


def test_a_job_survives_a_hub_killed_mid_run_and_is_charged_once(wb, api):
    """kill -9 the hub while a job runs: `workbench up` stops everything else but leaves the job running; a new
    `workbench up` on the same state folder follows it to completion and charges its run once."""
    wb.stop()  # the module's workbench: this test needs one it can crash (same policy, same state folder)
    put_notebook("researcher")
    w = Workbench(wb.state_dir, config=wb.config).start()
    try:
        a = Api(w)
        job = a.submit("researcher", notebook="calc.ipynb", profile="cpu-large", parameters={"n": 4, "sleep": 45})
        a.wait("researcher", job["id"], ("running",))
        procs = job_processes(job)
        hub = next(p for p in w.snapshot() if any(part.endswith("/jupyterhub") for part in p.cmdline()))
        hub.kill()
        assert w.proc.wait(120) != 0
    finally:
        w.stop()
    # everything but the job is gone; the job still runs
    left = w.leftovers()
    assert left and all(p.is_running() for p in procs[:1]), (left, procs)
    assert {int(x.split()[0]) for x in left} <= {p.pid for p in procs} | {
        c.pid for p in procs if p.is_running() for c in p.children(recursive=True)
    }, left

    again = Workbench(wb.state_dir, config=wb.config).start()
    try:
        a = Api(again)
        done = a.wait("researcher", job["id"], ("completed", "failed", "timeout"), timeout=300)
        assert done["state"] == "completed", (done, a.jobs("researcher", path=f"/{job['id']}/log").text)
        assert f"result 8 {USER_PREFIX}researcher" in output_text(a, "researcher", job["id"])
        row = closed_row(again, f"job:researcher/{job['id']}")  # one row: charged once
        assert seconds(row) >= 45 and abs(seconds(row) - done["duration_seconds"]) < 1.5
    finally:
        assert again.stop() == 0
    assert not again.leftovers(), again.leftovers()
