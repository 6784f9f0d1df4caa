"""Supercomputer mode end to end: notebook servers as Slurm jobs of the user's account (`--spawner slurm`).

A real `workbench up --spawner slurm --gateway-backend slurm` (hub, proxy, quota service, gateway) against the
real one-node Slurm of scripts/slurm-up.sh (partitions cpu and gpu; four PRETEND H100s as GRES: character
devices stand in for GPUs, which these machines lack). Each server is a job read back with `scontrol show job`;
JupyterLab answers through the proxy; the usage ledger is read from the quota service's database. Mocked: the GPUs
only (pretend GRES devices, and their utilisation read by the jobs from a JSON file instead of NVML). Some tests
kill -9 the hub of a second workbench and start it again on the same state folder.

Fixtures (module): ``material`` (test_course_material's course repository behind a real `git daemon`, whose course
the policy of ``wb`` names), ``wb`` (the workbench shared by every test that does not crash it, and a token of
researcher), ``crashable`` (a second workbench for the tests that kill -9 its hub).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from workbench.embedded.up import HUB_CONFIG_DIR
from workbench.policy import load_policy
from workbench.services.quota.ledger import Ledger, default_db_url
from workbench.spawn.slurm_jobs import parse_scontrol
from workbench.sysusers import USER_PREFIX

from .harness import DEMO, Workbench
from .test_course_material import COURSE, EXERCISE, Env
from .test_slurm import scontrol_job, sinfo_answers, slurm, slurm_env, squeue  # noqa: F401 - the `slurm` fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="servers run as per-user accounts through sudo: needs root"),
]

USER, UNIX_USER = "researcher", f"{USER_PREFIX}researcher"
ITEM = "server:researcher/"


def policy_data(material: Env | None = None) -> dict:
    """demo.yaml with profiles that fit the 2-core test node and `slurm:` placement for physics-lab; with
    ``material``, the course's material from its repository and its student cm-student1 (as test_course_material
    has them)."""
    data = yaml.safe_load(DEMO.read_text())
    if material is not None:
        data["auth"]["demo_users"]["cm-student1"] = {"groups": [COURSE]}
        data["groups"][COURSE]["material"] = {"git": material.repo_url, "branch": "main"}
        data.setdefault("storage", {})["courses"] = str(material.root / "courses" / "{course}")
    data["auth"]["demo_users"]["broke"] = {"groups": ["broke-lab"]}
    data["profiles"]["tiny"] = {"cpu": 1, "memory": "512Mi", "image": "base"}
    data["profiles"]["h100-x2"] = {
        "cpu": 1,
        "memory": "512Mi",
        "image": "gpu-pytorch",
        "gpu": {"type": "h100", "count": 2},
        "slurm": {"partition": "gpu"},
        "gpu_idle_timeout": f"{GPU_IDLE}s",
    }
    data["culling"] = {"timeout": "1h", "every": "2s", "warn_before": [f"{WARN}s"]}
    users = data["auth"]["demo_users"]
    users.update({"brief": {"groups": ["brief-lab"]}, "capped1": {"groups": ["capped-lab"]},
                  "capped2": {"groups": ["capped-lab"]}})  # fmt: skip
    data["profiles"]["brief"] = {"cpu": 1, "memory": "512Mi", "image": "base"}
    data["profiles"]["idle-soon"] = {"cpu": 1, "memory": "512Mi", "image": "base", "idle_timeout": f"{IDLE}s"}
    data["groups"]["brief-lab"] = {
        "kind": "research",
        "profiles": ["brief"],
        "session": {"max_age": f"{SESSION}s"},
        "slurm": {"partition": "cpu"},
        "dask": {"max_cores": 2, "max_memory": "2G", "max_workers": 1, "max_clusters": 1, "worker_max_cores": 1,
                 "worker_max_memory": "1G", "slurm": {"partition": "cpu"}},
    }  # fmt: skip
    data["groups"]["capped-lab"] = {
        "kind": "research",
        "profiles": ["idle-soon"],
        "caps": {"running_servers": 1},
        "slurm": {"partition": "cpu"},
    }
    lab = data["groups"]["physics-lab"]
    lab["profiles"] = ["tiny", "h100-x2"]
    lab["session"] = {"max_age": "2h"}
    lab["slurm"] = {"partition": "cpu", "account": "physics-lab"}
    data["groups"]["broke-lab"] = {"kind": "research", "profiles": ["tiny"], "budget": {"cpu_hours": 0}}
    return data


#: gpu_idle_timeout of the GPU profile
GPU_IDLE = 15
#: brief-lab's session limit and how long ahead its users are warned; idle-soon's idle limit (seconds). The warning
#: comes WARN s after the start and the stop SESSION - WARN s later: the server's job and its cluster's scheduler
#: job are started before the warning, and the job's JupyterLab shows the warning in between
SESSION, WARN, IDLE = 75, 45, 30
#: the start timeout the tests' hub config gives the Slurm spawner (an admin's `--hub-config-dir` sets it likewise)
START_TIMEOUT = 90


def hub_config_dir(parent: Path) -> Path:
    """The shipped hub config, plus an admin's line: ``c.WorkbenchSlurmSpawner.start_timeout``; and the jobs read
    their PRETEND GPUs' utilisation from ``<parent>/gpu-utilisation.json`` (the mock of the GPU: none here)."""
    folder = parent / "hub_config"
    shutil.copytree(HUB_CONFIG_DIR, folder)
    with open(folder / "jupyterhub_config.py", "a") as f:
        f.write(f"\nc.WorkbenchSlurmSpawner.start_timeout = {START_TIMEOUT}\n")
        f.write(
            "c.WorkbenchSlurmSpawner.environment['WORKBENCH_GPU_UTILISATION_FILE'] = "
            f"{str(parent / 'gpu-utilisation.json')!r}\n"
        )
    return folder


def write_utilisation(w: Workbench, percent: float) -> None:
    """What the pretend GPUs of the node read (indexes as Slurm grants them), readable by the job's user."""
    path = w.state_dir.parent / "gpu-utilisation.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(i): percent for i in range(4)}))
    tmp.chmod(0o644)
    tmp.replace(path)


def new_workbench(prefix: str, material: Env | None = None) -> Workbench:
    parent = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    parent.chmod(0o711)
    config = parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data(material)))
    args = ("--spawner", "slurm", "--gateway-backend", "slurm", "--hub-config-dir", str(hub_config_dir(parent)))
    return Workbench(parent / "state", config=config, extra_args=args)


@pytest.fixture(scope="module")
def material():
    """test_course_material's repository behind `git daemon` (its ``Env``; the Env's own workbench is never
    started: ``wb`` serves the course)."""
    env = Env()
    try:
        yield env
    finally:
        env.close()


@pytest.fixture(scope="module")
def wb(slurm, material):  # noqa: F811
    w = new_workbench("wb-it-slurmspawn-", material)
    parent = w.state_dir.parent
    w.start()
    try:
        yield w, w.new_token(w.login(USER), USER)
    finally:
        assert w.stop() == 0, w.output()
        deadline = time.monotonic() + 30
        while squeue() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert squeue() == [], "a server's job outlived the workbench"
    shutil.rmtree(parent, ignore_errors=True)


def ledger_rows(w: Workbench) -> list:
    led = Ledger(default_db_url(w.state_dir), load_policy(w.config), create=False)
    return [r for r in led.rows(group="physics-lab") if r.item == ITEM]


def server_jobs() -> list[dict]:
    return [j for j in squeue() if j["name"] == f"jupyter-{UNIX_USER}"]


def job_detail(job_id: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True, text=True, env=slurm_env())
    return res.stdout


def server_environ(job_id: str) -> dict:
    """The environment of the job's JupyterLab process (read as root from /proc)."""
    for p in psutil.process_iter(["username", "cmdline"]):
        if p.info["username"] == UNIX_USER and any("jupyterhub-singleuser" in c for c in p.info["cmdline"] or []):
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job_id:
                return env
    raise AssertionError(f"no server process of job {job_id}")


def run_and_read_back(w: Workbench, token: str, profile: str) -> tuple[dict, dict]:
    started = datetime.now(UTC)
    w.start_server(token, USER, timeout=240, profile=profile)
    [job] = server_jobs()
    detail = scontrol_job(job["id"])
    # JupyterLab answers through the proxy, with the user's token
    r = requests.get(f"{w.url}/user/{USER}/api/status", headers={"Authorization": f"token {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    env = server_environ(job["id"])
    status = Path(f"/proc/{lab_pid(job['id'])}/status").read_text().splitlines()
    gids = next(line for line in status if line.startswith("Groups:")).split()[1:]
    detailed = job_detail(job["id"])  # while it runs: the GRES indexes Slurm granted
    time.sleep(2)  # some run time to account
    w.stop_server(token, USER)
    info = parse_scontrol(
        subprocess.run(["scontrol", "show", "job", "-o", job["id"]], capture_output=True, text=True).stdout
    )
    assert info is not None and info.ended, info
    rows = [r for r in ledger_rows(w) if r.stop is not None and r.start >= started.replace(microsecond=0)]
    charged = [r for r in rows if r.stop > r.start]
    assert len(charged) == 1, rows
    row = charged[0]
    # the row is the job's run: Slurm's StartTime to EndTime (whole seconds), with the profile's cores and GPUs
    assert abs((row.start - info.start).total_seconds()) < 1.5, (row, info)
    assert abs((row.stop - info.end).total_seconds()) < 1.5, (row, info)
    assert row.profile == profile
    return detail | {"_env": env, "_row": row, "_detailed": detailed, "_gids": gids}, job


def test_cpu_profile_runs_as_a_job_with_the_policy_options_and_lab_answers(wb):
    w, token = wb
    detail, job = run_and_read_back(w, token, "tiny")
    assert detail["UserId"].startswith(f"{UNIX_USER}(")
    assert (detail["Partition"], detail["Account"], detail["TimeLimit"]) == ("cpu", "physics-lab", "02:00:00")
    assert (detail["NumCPUs"], detail["MinMemoryNode"]) == ("1", "512M")
    assert detail.get("TresPerNode", "(null)") == "(null)"
    assert detail["_env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert detail["_row"].gpu_count == 0 and detail["_row"].cpu == 1.0
    # the group's shared folder (members only, setgid) and the datasets folder, at the other engines' paths;
    # the job's server runs with the group's gid
    gid = grp.getgrnam(f"{USER_PREFIX}g-physics-lab").gr_gid
    shared = Path(load_policy(w.config).storage.shared.format(group="physics-lab")).stat()
    assert shared.st_gid == gid and stat.S_IMODE(shared.st_mode) == 0o2770
    assert str(gid) in detail["_gids"], detail["_gids"]
    assert stat.S_IMODE(Path(load_policy(w.config).storage.datasets).stat().st_mode) == 0o755


def test_gpu_profile_gets_the_gres_and_the_devices_slurm_granted(wb):
    w, token = wb
    detail, job = run_and_read_back(w, token, "h100-x2")
    assert detail["Partition"] == "gpu" and detail["Account"] == "physics-lab"
    assert "gpu:h100:2" in detail["TresPerNode"]
    granted = re.search(r"GRES=gpu:h100:2\(IDX:([0-9,-]+)\)", detail["_detailed"])
    assert granted, detail["_detailed"]
    idx = granted.group(1)
    lo, _, hi = idx.partition("-")
    expected = ",".join(str(i) for i in range(int(lo), int(hi or lo) + 1)) if "," not in idx else idx
    assert detail["_env"]["CUDA_VISIBLE_DEVICES"] == expected
    assert (detail["_row"].gpu_type, detail["_row"].gpu_count) == ("h100", 2)


def progress_messages(w: Workbench, token: str, until: str, timeout: float = 60) -> list[str]:
    """The spawn page's progress events (the hub's event stream) until one contains ``until``."""
    seen = []
    with requests.get(
        f"{w.url}/hub/api/users/{USER}/server/progress",
        headers={"Authorization": f"token {token}"},
        stream=True,
        timeout=timeout,
    ) as r:
        deadline = time.monotonic() + timeout
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                seen.append(line)
                if until in line:
                    return seen
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no progress event with {until!r}: {seen}")


def test_a_pending_job_shows_slurms_reason_and_is_cancelled_when_abandoned(wb):
    w, token = wb
    subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=DOWN"], check=True, env=slurm_env())
    try:
        r = w.token_api(token, "POST", f"/users/{USER}/server", json={"profile": "h100-x2"})
        assert r.status_code == 202, r.text
        seen = progress_messages(w, token, "PartitionDown")
        [job] = server_jobs()
        assert job["state"] == "PENDING"
        assert any(f"Slurm job {job['id']}: PENDING" in m for m in seen), seen
        w.stop_server(token, USER)  # abandon the pending spawn
        info = parse_scontrol(
            subprocess.run(["scontrol", "show", "job", "-o", job["id"]], capture_output=True, text=True).stdout
        )
        assert info is not None and info.state == "CANCELLED", info
        assert server_jobs() == []
        [row] = [r for r in ledger_rows(w) if r.stop is not None][-1:]
        assert row.stop == row.start  # it never ran: nothing charged
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=UP"], check=True, env=slurm_env())


def test_a_spent_budget_is_refused_before_sbatch(wb):
    w, _ = wb
    token = w.new_token(w.login("broke"), "broke")
    r = w.token_api(token, "POST", "/users/broke/server", json={"profile": "tiny"})
    assert r.status_code == 403, r.text
    assert "CPU budget of group broke-lab exhausted" in r.json()["message"]
    assert squeue(f"{USER_PREFIX}broke") == []
    assert "Submitting broke's server" not in w.hub_log()


def test_a_job_still_pending_at_the_start_timeout_is_cancelled_with_slurms_reason_and_not_charged(wb):
    """The hub's `start_timeout` (set in the hub config, as an admin would) bounds the queue: a job still pending
    shortly before it is cancelled, the spawn fails saying why, and the admission's row charges nothing."""
    w, token = wb
    subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=DOWN"], check=True, env=slurm_env())
    try:
        r = w.token_api(token, "POST", f"/users/{USER}/server", json={"profile": "h100-x2"})
        assert r.status_code == 202, r.text
        seen = progress_messages(w, token, "start timeout", timeout=START_TIMEOUT + 60)
        failed = seen[-1]
        assert '"failed": true' in failed, seen
        job_id = re.search(r"Slurm job ([0-9]+): PENDING, reason: PartitionDown", failed)
        assert job_id, failed
        assert f"still waiting in Slurm's queue after {START_TIMEOUT} s" in failed
        info = parse_scontrol(
            subprocess.run(["scontrol", "show", "job", "-o", job_id.group(1)], capture_output=True, text=True).stdout
        )
        assert info is not None and info.state == "CANCELLED", info
        assert server_jobs() == []
        wait_for(lambda: not w.token_api(token, "GET", f"/users/{USER}").json().get("servers"), 60, "no server")
        [row] = [r for r in ledger_rows(w) if r.stop is not None][-1:]
        assert row.stop == row.start  # it never ran: nothing charged
        assert not [r for r in ledger_rows(w) if r.stop is None]
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=UP"], check=True, env=slurm_env())


def test_a_gpu_job_whose_own_reports_say_its_gpus_are_idle_is_culled(wb):
    """GPU-idle culling for a server on a compute node: the job reports its GPUs' utilisation (the reader in the
    job is the named mock, a JSON file for the PRETEND GPUs, as for local servers), the sessions service counts
    the idle stretch from the reports and stops the server (scancel) once its GPUs were idle gpu_idle_timeout."""
    w, token = wb
    write_utilisation(w, 90)
    mark = len(w.hub_log())
    w.start_server(token, USER, timeout=240, profile="h100-x2")
    [job] = server_jobs()
    wait_for(lambda: "GPU report of researcher's server '': busy" in w.hub_log()[mark:], 60, "the job's first report")
    busy_from = time.time()
    admin = w.new_token(w.login("admin"), "admin")

    def checked_past_the_limit():  # busy GPUs for longer than gpu_idle_timeout, by the service's own checks
        r = requests.get(f"{w.url}/services/sessions/api/status", headers={"Authorization": f"token {admin}"},
                         timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        seen = r.json()["servers"].get(f"{USER}/")
        return seen if seen and hub_time(seen["last_checked"]) > busy_from + GPU_IDLE + 1 else None

    seen = wait_for(checked_past_the_limit, 120, f"the sessions service to check the server past {GPU_IDLE}s")
    assert seen["profile"] == "h100-x2" and seen["gpu_idle_since"] is None and seen["last_action"] is None, seen
    assert w.token_api(token, "GET", f"/users/{USER}").json().get("servers"), "stopped although its GPUs were busy"
    write_utilisation(w, 0)
    idle_from = time.time()
    wait_for(lambda: "GPU report of researcher's server '': idle" in w.hub_log()[mark:], 60, "an idle report")
    wait_for(lambda: not w.token_api(token, "GET", f"/users/{USER}").json().get("servers"), 90, "the server to stop")
    stopped_at = time.time()
    assert stopped_at >= idle_from + GPU_IDLE - 1, (idle_from, stopped_at)  # counted from the idle reports
    wait_for(lambda: not server_jobs(), 30, "the job to leave the queue")
    assert final_state(job["id"]) == "CANCELLED"
    r = requests.get(
        f"{w.url}/services/sessions/api/notifications", headers={"Authorization": f"token {token}"}, timeout=30
    )
    [note] = [n for n in r.json()["notifications"] if "GPUs were idle" in n["message"]]
    assert f"the limit for h100-x2 is {GPU_IDLE}s" in note["message"], note
    assert not [r for r in ledger_rows(w) if r.stop is None]


def final_state(job_id: str) -> str:
    """The job's state once Slurm has finished ending it (past COMPLETING)."""
    return wait_for(
        lambda: (state := scontrol_job(job_id)["JobState"]) not in ("RUNNING", "COMPLETING") and state,
        60,
        f"job {job_id} to finish ending",
    )


def hub_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def user_server(w: Workbench, token: str, user: str) -> dict | None:
    return w.token_api(token, "GET", f"/users/{user}").json().get("servers", {}).get("")


def notes_of(w: Workbench, token: str) -> list[dict]:
    r = requests.get(
        f"{w.url}/services/sessions/api/notifications", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["notifications"]


def test_a_job_servers_session_limit_warns_then_stops_it_and_its_dask_cluster(wb):
    """The sessions service treats a job like any server: a warning ahead of the session limit, then the stop
    (scancel, not Slurm's own time limit), and the user's Dask cluster (Slurm jobs too) stops with it."""
    w, _ = wb
    token = w.new_token(w.login("brief"), "brief")
    server = w.start_server(token, "brief", timeout=240)
    started = hub_time(server["started"])
    [job] = squeue(f"{USER_PREFIX}brief")
    with w.gateway(token) as gw:
        cluster = gw.new_cluster(shutdown_on_close=False)  # ended by nothing but the server's stop
        assert [c.name for c in gw.list_clusters()] == [cluster.name]
        assert len(squeue(f"{USER_PREFIX}brief")) == 2  # the server's job and the cluster's scheduler
        notes = wait_for(lambda: notes_of(w, token), SESSION + 30, "the session warning")
        assert user_server(w, token, "brief") is not None, "stopped before any warning"
        [note] = notes
        assert note["level"] == "critical" and "will be stopped in" in note["message"], note
        assert "session limit is 1m 15s" in note["message"], note  # SESSION

        def in_lab() -> list[dict]:  # the job's JupyterLab (through the proxy) shows it too (it caches briefly)
            r = requests.get(f"{w.url}/user/brief/workbench/notifications", headers=auth, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["problems"] == [], r.json()  # it reached the services from the compute node
            return [n for n in r.json()["notifications"] if n["source"] == "sessions"]

        auth = {"Authorization": f"token {token}"}
        [lab_note] = wait_for(in_lab, 30, "the warning in the job's JupyterLab")
        assert lab_note["level"] == "critical" and "will be stopped in" in lab_note["message"], lab_note
        wait_for(lambda: user_server(w, token, "brief") is None, SESSION + 60, "the stop at the session limit")
        assert time.time() >= started + SESSION - 1
        assert final_state(job["id"]) == "CANCELLED"  # stopped by the platform, not Slurm's TIMEOUT
        wait_for(lambda: not gw.list_clusters(), 60, "the cluster to stop with the server")
    wait_for(lambda: not squeue(f"{USER_PREFIX}brief"), 60, f"no job of {USER_PREFIX}brief left")
    notes = notes_of(w, token)
    assert [n["level"] for n in notes] == ["critical", "info"], notes
    assert "reached its session limit" in notes[1]["message"]
    assert "Stopped 1 Dask cluster(s) of brief with their server" in w.hub_log()


def test_a_server_cap_refuses_a_second_job_before_sbatch_and_an_idle_job_is_culled(wb):
    """capped-lab may run one server at once: a second member is refused (403, the cap's message) and nothing is
    submitted; the first member's job, idle, is stopped at its profile's idle limit (scancel)."""
    w, _ = wb
    one, two = (w.new_token(w.login(u), u) for u in ("capped1", "capped2"))
    w.start_server(one, "capped1", timeout=240)
    [job] = squeue(f"{USER_PREFIX}capped1")
    r = w.token_api(two, "POST", "/users/capped2/server", json={})
    assert r.status_code == 403, r.text
    assert "Group capped-lab already runs 1 of at most 1 servers at once" in r.json()["message"]
    assert squeue(f"{USER_PREFIX}capped2") == []
    assert "Submitting capped2's server" not in w.hub_log()
    last = hub_time(user_server(w, one, "capped1")["last_activity"])
    wait_for(lambda: user_server(w, one, "capped1") is None, IDLE + 90, "the idle server to be culled")
    assert time.time() >= last + IDLE - 1
    assert final_state(job["id"]) == "CANCELLED"
    [note] = [n for n in notes_of(w, one) if n["level"] == "info"]
    assert "idle" in note["message"], note


# -- a hub killed with servers running as jobs ------------------------------------------------------------


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


class Crashable:
    """A workbench that a test may kill -9 and start again on the same state folder and public port."""

    def __init__(self):
        self.w = new_workbench("wb-it-slurmcrash-").start()
        self.token = self.w.new_token(self.w.login(USER), USER)
        self.admin = self.w.new_token(self.w.login("admin"), "admin")

    def crash(self) -> None:
        """kill -9 the hub; `workbench up` notices, stops what is left of its processes and fails."""
        hub = next(p for p in self.w.snapshot() if any(part.endswith("/jupyterhub") for part in p.cmdline()))
        hub.kill()
        assert self.w.proc.wait(120) != 0
        self.w.stop()

    def restart(self) -> Workbench:
        again = Workbench(self.w.state_dir, config=self.w.config, extra_args=self.w.extra_args)
        again.port, again.url = self.w.port, self.w.url
        self.w = again.start()
        return again

    def reconcile(self) -> dict:
        """One reconcile of the quota service with the hub's servers, now (its result)."""
        r = requests.post(
            f"{self.w.url}/services/quota/api/reconcile/hub",
            headers={"Authorization": f"token {self.admin}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def crashable(slurm):  # noqa: F811
    c = Crashable()
    try:
        yield c
    finally:
        assert c.w.stop() == 0, c.w.output()
        wait_for(lambda: not server_jobs(), 30, "the servers' jobs to end with the workbench")
    shutil.rmtree(c.w.state_dir.parent, ignore_errors=True)


def lab_pid(job_id: str) -> int:
    for p in psutil.process_iter(["username", "cmdline"]):
        if p.info["username"] == UNIX_USER and any("jupyterhub-singleuser" in c for c in p.info["cmdline"] or []):
            if p.environ().get("SLURM_JOB_ID") == job_id:
                return p.pid
    raise AssertionError(f"no server process of job {job_id}")


def test_a_hub_killed_while_a_server_runs_as_a_job_finds_it_again(crashable):
    """kill -9 the hub: the job runs on; the restarted hub (same ports, from the state folder) finds it from its
    state and Slurm's, JupyterLab answers through the new proxy, and the usage row stays the one open row."""
    w, token = crashable.w, crashable.token
    w.start_server(token, USER, timeout=240, profile="tiny")
    [job] = server_jobs()
    pid = lab_pid(job["id"])
    [before] = [r for r in ledger_rows(w) if r.stop is None]
    ports = {k: w.runtime[k] for k in ("hub_port", "proxy_api_port")}
    crashable.crash()
    assert [j["id"] for j in server_jobs()] == [job["id"]]  # the job outlives the hub
    again = crashable.restart()
    assert {k: again.runtime[k] for k in ports} == ports
    assert "reusing the ports of the previous start" in again.output()
    assert f"{USER} still running" in again.hub_log()
    server = again.token_api(crashable.admin, "GET", f"/users/{USER}").json()["servers"][""]  # state: admins only
    assert server["ready"] and server["state"]["job_id"] == job["id"], server
    r = requests.get(f"{again.url}/user/{USER}/api/status", headers={"Authorization": f"token {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert [j["id"] for j in server_jobs()] == [job["id"]] and lab_pid(job["id"]) == pid  # the same job and process
    result = crashable.reconcile()
    assert ITEM not in result["closed"], result
    assert [r.id for r in ledger_rows(again) if r.stop is None] == [before.id]
    again.stop_server(token, USER)
    wait_for(lambda: not server_jobs(), 30, "the job to leave the queue")
    assert [r.id for r in ledger_rows(again) if r.stop is None] == []


def test_a_job_that_ended_while_the_hub_was_down_is_recorded_stopped_at_slurms_end_time(crashable):
    """kill -9 the hub, then the job ends (scancel) before the restart: the restarted hub records the server
    stopped, and the usage is charged up to Slurm's EndTime, not to the restart."""
    w, token = crashable.w, crashable.token
    w.start_server(token, USER, timeout=240, profile="tiny")
    [job] = server_jobs()
    started = scontrol_job(job["id"])
    crashable.crash()
    subprocess.run(["scancel", job["id"]], check=True, env=slurm_env())
    info = wait_for(
        lambda: (i := parse_scontrol(subprocess.run(["scontrol", "show", "job", "-o", job["id"]], capture_output=True,
                                                    text=True, env=slurm_env()).stdout)) and i.ended and i,
        60, "the job to end",
    )  # fmt: skip
    time.sleep(2)  # the restart is later than the job's end by at least this (the test tells them apart)
    restarted_at = datetime.now(UTC)
    again = crashable.restart()
    assert "appears to have stopped while the Hub was down" in again.hub_log()
    assert not again.token_api(token, "GET", f"/users/{USER}").json().get("servers")

    def charged():
        since = info.start.replace(microsecond=0) - timedelta(seconds=2)
        rows = [r for r in ledger_rows(again) if r.start >= since and (r.stop is None or r.stop > r.start)]
        return rows if rows and all(r.stop is not None for r in rows) and abs(
            (rows[-1].stop - info.end).total_seconds()) < 1.5 else None  # fmt: skip

    rows = wait_for(charged, 120, f"the usage to be closed at Slurm's EndTime {info.end}: {ledger_rows(again)}")
    assert info.end < restarted_at
    # the job's run, once: from Slurm's StartTime to its EndTime, rows back to back, none through the restart
    assert abs((rows[0].start - info.start).total_seconds()) < 1.5, (rows, started)
    for a, b in zip(rows, rows[1:], strict=False):
        assert a.stop <= b.start, rows
    assert sum((r.stop - r.start).total_seconds() for r in rows) <= (info.end - info.start).total_seconds() + 1.5
    assert all(r.stop < restarted_at for r in rows)


def test_course_material_reaches_a_students_job(wb):
    """test_course_material's course (a real git repository behind `git daemon`, the ``material`` fixture) on the
    module's `--spawner slurm` workbench: the material is pulled into the student's home as the student before
    the job starts, and the job's JupyterLab serves it. (The workbench's clean stop, with no job left, is
    asserted by the ``wb`` fixture.)"""
    w, _ = wb
    token = w.new_token(w.login("cm-student1"), "cm-student1")
    w.start_server(token, "cm-student1", timeout=240)
    [job] = squeue(f"{USER_PREFIX}cm-student1")
    folder = w.home("cm-student1") / COURSE
    assert (folder / "exercise.md").read_text() == EXERCISE
    assert (folder / "exercise.md").stat().st_uid == pwd.getpwnam(f"{USER_PREFIX}cm-student1").pw_uid
    r = requests.get(
        f"{w.url}/user/cm-student1/api/contents/{COURSE}/exercise.md",
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["content"] == EXERCISE, r.text
    w.stop_server(token, "cm-student1")
    assert final_state(job["id"]) == "CANCELLED"
