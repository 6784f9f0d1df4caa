"""Notebook jobs end to end on the real one-node Slurm: a real `workbench up --gateway-backend slurm` (hub, proxy,
quota service, jobs service as root), jobs submitted with users' hub tokens, run by Slurm as wb-<user>.

The policy is hub_config/demo.yaml plus a profile `h100-small` (1 core, 1 GiB, one pretend H100 GRES: the GPUs are
pretend, the Slurm scheduling of the GRES is real) for physics-lab.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
import time
from datetime import datetime

import nbformat
import pytest
import requests
import yaml

from workbench.sysusers import USER_PREFIX

from .harness import DEMO, Workbench
from .jobs_notebook import put_dask_notebook, put_notebook
from .test_slurm import scontrol_job, slurm, slurm_env, squeue  # noqa: F401  (the slurm fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as per-user accounts through Slurm: needs root"),
]


@pytest.fixture(scope="module")
def wb(tmp_path_factory, slurm):  # noqa: F811
    tmp = tmp_path_factory.mktemp("jobs")
    policy = yaml.safe_load(DEMO.read_text())
    policy["profiles"]["h100-small"] = {"cpu": 1, "memory": "1G", "gpu": {"type": "h100", "count": 1}, "image": "base"}
    policy["groups"]["physics-lab"]["profiles"].append("h100-small")
    policy["groups"]["startup-acme"]["budget"] = {"gpu_hours": 0, "cpu_hours": 0, "period": "month"}
    config = tmp / "platform.yaml"
    config.write_text(yaml.safe_dump(policy))
    w = Workbench(tmp / "state", config=config, extra_args=("--gateway-backend", "slurm")).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def tokens(wb):
    out = {}
    for user in ("researcher", "student1", "student2", "startup"):
        s = wb.login(user)
        out[user] = wb.new_token(s, user)
    return out


def jobs(wb, token, method="GET", path="", **kw):
    return requests.request(
        method, f"{wb.url}/services/jobs/api/jobs{path}", headers={"Authorization": f"token {token}"}, timeout=60, **kw
    )


def wait_state(wb, token, job_id, states, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = jobs(wb, token, path=f"/{job_id}").json()
        if doc["state"] in states:
            return doc
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not {states}: {doc}\n{(wb.state_dir / 'logs').iterdir()}")


def ledger_rows(wb, item):
    with sqlite3.connect(wb.state_dir / "quota.sqlite") as db:
        return db.execute("SELECT start, stop, cpu, gpu_count FROM quota_usage WHERE item = ?", (item,)).fetchall()


def secs(t):
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


def test_a_parameterised_gpu_notebook_runs_as_the_user_and_is_charged_its_run_time(wb, tokens):
    put_notebook("researcher")
    r = jobs(
        wb,
        tokens["researcher"],
        "POST",
        json={"notebook": "calc.ipynb", "profile": "h100-small", "parameters": {"n": 21, "sleep": 3}, "time": "10m"},
    )
    assert r.status_code == 201, r.text
    job = r.json()["jobs"][0]
    running = squeue()
    assert any(j["id"] == job["engine_id"] and j["user"] == f"{USER_PREFIX}researcher" for j in running), running
    info = scontrol_job(job["engine_id"])
    assert "gres/gpu:h100=1" in info.get("TRES", "") or "gpu:h100:1" in str(info), info
    done = wait_state(wb, tokens["researcher"], job["id"], ("completed", "failed"))
    assert done["state"] == "completed", jobs(wb, tokens["researcher"], path=f"/{job['id']}/log").text
    out = nbformat.reads(jobs(wb, tokens["researcher"], path=f"/{job['id']}/output").text, as_version=4)
    text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert f"result 42 {USER_PREFIX}researcher" in text
    home = pwd.getpwnam(f"{USER_PREFIX}researcher").pw_dir
    assert open(os.path.join(home, done["folder"], "result.txt")).read() == "42"
    # the ledger row of the run: Slurm's own start and end
    deadline = time.monotonic() + 30
    while not (rows := ledger_rows(wb, f"job:researcher/{job['id']}")) or rows[0][1] is None:
        assert time.monotonic() < deadline, rows
        time.sleep(1)
    ((start, stop, cpu, gpus),) = rows
    ran = datetime.fromisoformat(str(stop)).timestamp() - datetime.fromisoformat(str(start)).timestamp()
    assert abs(ran - done["duration_seconds"]) < 1.5 and gpus == 1 and cpu == 1
    assert abs(done["gpu_hours"] - done["duration_seconds"] / 3600) < 1e-4


def test_a_cancelled_job_leaves_squeue_and_is_charged_what_it_ran(wb, tokens):
    put_notebook("researcher")
    r = jobs(
        wb,
        tokens["researcher"],
        "POST",
        json={"notebook": "calc.ipynb", "profile": "h100-small", "parameters": {"sleep": 600}, "time": "20m"},
    )
    job = r.json()["jobs"][0]
    wait_state(wb, tokens["researcher"], job["id"], ("running",))
    # another student cannot see or cancel it
    assert jobs(wb, tokens["student1"], "DELETE", path=f"/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in jobs(wb, tokens["student1"]).json()["jobs"]]
    time.sleep(3)
    doc = jobs(wb, tokens["researcher"], "DELETE", path=f"/{job['id']}").json()
    doc = wait_state(wb, tokens["researcher"], job["id"], ("cancelled",))
    assert not [j for j in squeue() if j["id"] == job["engine_id"]]
    assert 2 < doc["duration_seconds"] < 120


def test_a_group_without_budget_is_refused_before_submission(wb, tokens):
    put_notebook("startup")
    before = squeue(f"{USER_PREFIX}startup")
    r = jobs(wb, tokens["startup"], "POST", json={"notebook": "calc.ipynb", "profile": "cpu-small"})
    assert r.status_code == 403 and "budget of group startup-acme exhausted" in r.json()["message"], r.text
    assert squeue(f"{USER_PREFIX}startup") == before == []
    assert jobs(wb, tokens["startup"]).json()["jobs"] == []


def test_bad_requests_name_the_field(wb, tokens):
    r = jobs(wb, tokens["researcher"], "POST", json={"notebook": "calc.ipynb", "profile": "cpu-large", "time": "9h"})
    assert r.status_code == 400 and "ask for --time 4h or less" in r.json()["message"]
    r = jobs(wb, tokens["student1"], "POST", json={"notebook": "calc.ipynb", "profile": "h100-small"})
    assert r.status_code == 403 and "choose one of: cpu-small, mig-1g" in r.json()["message"]
    assert json.loads(r.text)["status"] == 403


def test_a_slurm_jobs_gateway_token_is_in_no_slurm_record_and_dies_with_the_run(wb, tokens):
    """The run's gateway token reaches the Slurm job through a 0600 file in its run folder: it is in neither
    ``scontrol show job -d`` (as another user and as root), ``squeue -o %all`` nor the batch script; cancelling the
    job leaves no cluster tagged with it and the hub refuses the token. (The notebook's worker may pend on this
    two-core node: the test needs only the cluster's record and the token.)"""
    from workbench.sysusers import system_username

    put_dask_notebook("researcher")
    r = jobs(
        wb,
        tokens["researcher"],
        "POST",
        json={"notebook": "dask_job.ipynb", "profile": "h100-small", "parameters": {"hold": 600}, "time": "20m"},
    )
    assert r.status_code == 201, r.text
    job = r.json()["jobs"][0]
    home = pwd.getpwnam(system_username("researcher")).pw_dir
    token_file = os.path.join(home, "jobs", "dask_job", job["run"], "token.txt")
    deadline = time.monotonic() + 240
    while not (os.path.exists(token_file) and open(token_file).read()):
        assert time.monotonic() < deadline, jobs(wb, tokens["researcher"], path=f"/{job['id']}/log").text
        time.sleep(1)
    token = open(token_file).read()
    assert wb.token_api(token, "GET", "/user").status_code == 200

    def run(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=slurm_env()).stdout

    other = system_username("student1")
    seen = {
        "scontrol as another user": run(
            "runuser", "-u", other, "--", "scontrol", "show", "job", "-dd", job["engine_id"]
        ),
        "squeue -o %all as another user": run("runuser", "-u", other, "--", "squeue", "-o", "%all"),
        "scontrol as root": run("scontrol", "show", "job", "-dd", job["engine_id"]),
        "the batch script": run("scontrol", "write", "batch_script", job["engine_id"], "-"),
    }
    assert job["engine_id"] in seen["scontrol as another user"]
    assert "DASK_GATEWAY__CLUSTER__OPTIONS__WORKBENCH_JOB" in seen["the batch script"]
    assert [where for where, text in seen.items() if token in text] == []
    assert not os.path.exists(os.path.join(home, "jobs", "dask_job", job["run"], ".gateway-token"))
    assert jobs(wb, tokens["researcher"], "DELETE", path=f"/{job['id']}").status_code == 200
    wait_state(wb, tokens["researcher"], job["id"], ("cancelled",))
    with wb.gateway(tokens["researcher"]) as gw:
        deadline = time.monotonic() + 120
        while [c for c in gw.list_clusters() if (c.options or {}).get("workbench_job") == f"job-{job['id']}"]:
            assert time.monotonic() < deadline, "the cancelled job's cluster is still running"
            time.sleep(1)
    deadline = time.monotonic() + 60
    while wb.token_api(token, "GET", "/user").status_code == 200:
        assert time.monotonic() < deadline, "the run's token still works after the run"
        time.sleep(1)
