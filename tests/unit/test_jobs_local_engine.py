"""The embedded engine's jobs outlive the jobs service and `workbench up`: a restarted service follows a job by its
pid *and* start time (a reused pid is not taken for it), reports the exit status the job wrote, counts its end
no earlier than it was last seen alive, and `workbench up` spares exactly the running jobs' processes (from the
platform's own table). Real processes (``sleep``), run as the test's own user; no mock."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from workbench.jobs.engines import (
    TIMEOUT_EXIT,
    Account,
    LocalEngine,
    _process_key,
    find_process,
    local_job_processes,
    local_timeout,
)
from workbench.jobs.store import JobStore


@pytest.fixture
def sleeper():
    procs = []

    def start(seconds: float = 60, child: bool = False) -> subprocess.Popen:
        spawn = "subprocess.Popen(['sleep', '60']); " if child else ""
        code = f"import time, subprocess; {spawn}time.sleep({seconds})"
        p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait()


def a_job(tmp_path, engine_id: str, **kw) -> dict:
    run_dir = tmp_path / "jobs" / "calc" / "r1"
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    return {
        "id": "abc123def456",
        "user": "ada",
        "submitter": "ada",
        "grp": "physics-lab",
        "profile": "cpu-small",
        "notebook": "calc.ipynb",
        "name": "calc",
        "run": "r1",
        "run_dir": str(run_dir),
        "params": "{}",
        "time_limit": 3600,
        "engine": "local",
        "engine_id": engine_id,
        "state": "running",
        "submitted": now - 10,
        "started": now - 10,
        "cpu": 1.0,
        "gpu_type": None,
        "gpu_count": 0,
        **kw,
    }


def engine_for(tmp_path) -> LocalEngine:
    me = Account(os.environ.get("USER", "root"), str(tmp_path), None)
    return LocalEngine(sys.executable, accounts=lambda user: me)


def poll(engine, job):
    return asyncio.run(engine.poll([job]))[job["id"]]


def test_a_restarted_service_follows_a_running_job_and_reads_its_exit_status(tmp_path, sleeper):
    p = sleeper()
    job = a_job(tmp_path, _process_key(p.pid))
    engine = engine_for(tmp_path)  # a new service: it did not start the process
    obs = poll(engine, job)
    assert obs.state == "running" and obs.started == job["started"]
    seen = time.time()
    os.killpg(p.pid, 9)
    p.wait()
    (tmp_path / "jobs/calc/r1/job.exit").write_text(f"0 {seen - 3600:.3f}\n")  # a claim of ending long ago
    obs = poll(engine, job)
    assert (obs.state, obs.exit_code) == ("completed", 0)
    assert seen - 1 <= obs.ended <= time.time()  # not before it was last seen alive


def test_a_job_that_ended_while_no_service_watched_ends_at_its_own_time_within_bounds(tmp_path, sleeper):
    p = sleeper()
    key = _process_key(p.pid)
    os.killpg(p.pid, 9)
    p.wait()
    job = a_job(tmp_path, key)
    (tmp_path / "jobs/calc/r1/job.exit").write_text(f"1 {job['started'] + 4:.3f}\n")
    obs = poll(engine_for(tmp_path), job)
    assert (obs.state, obs.exit_code, obs.ended) == ("failed", 1, pytest.approx(job["started"] + 4, abs=1e-3))
    (tmp_path / "jobs/calc/r1/job.exit").unlink()
    obs = poll(engine_for(tmp_path), job)
    assert obs.state == "failed" and obs.reason == "ended while the jobs service was down; no exit status"


def test_a_reused_pid_is_not_the_job(tmp_path, sleeper):
    p = sleeper()
    pid, _, created = _process_key(p.pid).partition("@")
    stale = f"{pid}@{float(created) - 100:.2f}"  # same pid, another process's start time
    assert find_process(stale) is None and find_process(_process_key(p.pid)).pid == p.pid
    assert find_process("garbage") is None and find_process(None) is None
    assert poll(engine_for(tmp_path), a_job(tmp_path, stale)).state == "failed"
    assert p.poll() is None  # and it was left alone


def test_an_adopted_job_can_be_cancelled(tmp_path, sleeper):
    import psutil

    p = sleeper(child=True)
    time.sleep(0.5)  # its child started
    group = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    assert len(group) == 2
    job = a_job(tmp_path, _process_key(p.pid))
    engine = engine_for(tmp_path)
    asyncio.run(engine.cancel(job))
    _, alive = psutil.wait_procs(group, timeout=10)  # the job's whole process group ended
    assert not [x for x in alive if x.status() != psutil.STATUS_ZOMBIE]
    assert poll(engine, job).state == "cancelled"


def test_workbench_up_spares_running_jobs_and_their_children_only(tmp_path, sleeper):
    store = JobStore(tmp_path / "jobs.sqlite")
    running, other, ended = sleeper(child=True), sleeper(), sleeper()
    time.sleep(0.5)  # its child started
    store.add({**a_job(tmp_path, _process_key(running.pid)), "id": "a1"})
    store.add({**a_job(tmp_path, _process_key(ended.pid)), "id": "a2", "state": "completed"})
    pid, _, created = _process_key(other.pid).partition("@")
    store.add({**a_job(tmp_path, f"{pid}@{float(created) + 5:.2f}"), "id": "a3"})  # not that process
    store.add({**a_job(tmp_path, _process_key(os.getpid())), "id": "a4", "engine": "slurm"})
    spared = local_job_processes(tmp_path)
    import psutil

    kids = {c.pid for c in psutil.Process(running.pid).children(recursive=True)}
    assert kids and spared == {running.pid} | kids
    assert local_job_processes(tmp_path / "nowhere") == set()


def test_the_local_time_limit_is_coreutils_timeout():
    assert local_timeout(90) == ["timeout", "--signal=TERM", "--kill-after=30", "90s"]
    assert subprocess.run([*local_timeout(1), "sleep", "5"]).returncode == TIMEOUT_EXIT
