"""Supercomputer mode end to end: notebook servers as Slurm jobs of the user's account (`--spawner slurm`).

A real `workbench up --spawner slurm --gateway-backend slurm` (hub, proxy, quota service, gateway) against the
real one-node Slurm of scripts/slurm-up.sh (partitions cpu and gpu; four PRETEND H100s as GRES: character
devices stand in for GPUs, which these machines lack). Each server is a job read back with `scontrol show job`;
JupyterLab answers through the proxy; the usage ledger is read from the quota service's database.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from workbench.policy import load_policy
from workbench.services.quota.ledger import Ledger, default_db_url
from workbench.spawn.slurm_jobs import parse_scontrol

from .harness import DEMO, Workbench
from .test_slurm import scontrol_job, sinfo_answers, slurm, slurm_env, squeue  # noqa: F401 - the `slurm` fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="servers run as per-user accounts through sudo: needs root"),
]

USER, UNIX_USER = "researcher", "wb-researcher"
ITEM = "server:researcher/"


def policy_data() -> dict:
    """demo.yaml with profiles that fit the 2-core test node and `slurm:` placement for physics-lab."""
    data = yaml.safe_load(DEMO.read_text())
    data["auth"]["demo_users"]["broke"] = {"groups": ["broke-lab"]}
    data["profiles"]["tiny"] = {"cpu": 1, "memory": "512Mi", "image": "base"}
    data["profiles"]["h100-x2"] = {
        "cpu": 1,
        "memory": "512Mi",
        "image": "gpu-pytorch",
        "gpu": {"type": "h100", "count": 2},
        "slurm": {"partition": "gpu"},
    }
    lab = data["groups"]["physics-lab"]
    lab["profiles"] = ["tiny", "h100-x2"]
    lab["session"] = {"max_age": "2h"}
    lab["slurm"] = {"partition": "cpu", "account": "physics-lab"}
    data["groups"]["broke-lab"] = {"kind": "research", "profiles": ["tiny"], "budget": {"cpu_hours": 0}}
    return data


@pytest.fixture(scope="module")
def wb(slurm):  # noqa: F811
    parent = Path(tempfile.mkdtemp(prefix="wb-it-slurmspawn-", dir="/tmp"))
    parent.chmod(0o711)
    config = parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data()))
    w = Workbench(parent / "state", config=config, extra_args=("--spawner", "slurm", "--gateway-backend", "slurm"))
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
    return detail | {"_env": env, "_row": row, "_detailed": detailed}, job


def test_cpu_profile_runs_as_a_job_with_the_policy_options_and_lab_answers(wb):
    w, token = wb
    detail, job = run_and_read_back(w, token, "tiny")
    assert detail["UserId"].startswith(f"{UNIX_USER}(")
    assert (detail["Partition"], detail["Account"], detail["TimeLimit"]) == ("cpu", "physics-lab", "02:00:00")
    assert (detail["NumCPUs"], detail["MinMemoryNode"]) == ("1", "512M")
    assert detail.get("TresPerNode", "(null)") == "(null)"
    assert detail["_env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert detail["_row"].gpu_count == 0 and detail["_row"].cpu == 1.0


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
    assert squeue("wb-broke") == []
    assert "Submitting broke's server" not in w.hub_log()
