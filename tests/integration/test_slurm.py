"""Dask Gateway's Slurm backend end to end: a real one-node Slurm and a real `workbench up`.

`workbench up --gateway-backend slurm` on hub_config/demo.yaml, with physics-lab also allowed GPU
workers (gpu_type h100, up to 2 per worker; the demo itself keeps its CPU-only options). The
Slurm cluster is the one scripts/slurm-up.sh starts (`make test` runs it first; this module runs
it too when `sinfo` does not answer): partitions cpu and gpu, four pretend H100s as GRES. Every
scheduler and worker is a Slurm job of wb-researcher, checked with squeue and scontrol.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from workbench.sysusers import USER_PREFIX

from .harness import DEMO, REPO, Workbench

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the Slurm backend submits jobs as per-user accounts: needs root"),
]

USER = "researcher"
UNIX_USER = f"{USER_PREFIX}researcher"
SQUEUE_FORMAT = "%i|%j|%P|%a|%l|%b|%T|%u|%C|%m"
SQUEUE_FIELDS = ("id", "name", "partition", "account", "time", "gres", "state", "user", "cpus", "memory")


def slurm_env() -> dict:
    """The environment of Slurm's commands here: the cluster at the default path (as the gateway's)."""
    return {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}


def sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15, env=slurm_env())
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and any(
        s.startswith(("idle", "mix", "alloc")) and "*" not in s for s in res.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm():
    if not sinfo_answers():
        res = subprocess.run([str(REPO / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not sinfo_answers():
            pytest.fail(
                "no usable Slurm cluster: `sinfo` does not answer and scripts/slurm-up.sh failed "
                f"(run `make slurm` as root and look at its output):\n{res.stdout}\n{res.stderr}"
            )


def squeue(user: str = UNIX_USER) -> list[dict]:
    res = subprocess.run(
        ["squeue", "-h", "-u", user, "-o", SQUEUE_FORMAT], capture_output=True, text=True, timeout=30, env=slurm_env()
    )
    assert res.returncode == 0, res.stderr
    return [dict(zip(SQUEUE_FIELDS, line.split("|"))) for line in res.stdout.splitlines() if line.strip()]


def scontrol_job(job_id: str) -> dict:
    res = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30, env=slurm_env()
    )
    assert res.returncode == 0, res.stderr
    return dict(item.split("=", 1) for item in res.stdout.split() if "=" in item)


def wait_no_jobs(user: str = UNIX_USER, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (jobs := squeue(user)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert jobs == [], f"jobs of {user} left after shutdown: {jobs}"


def gpu_config(tmp: Path) -> Path:
    """demo.yaml, with physics-lab's Dask workers also allowed up to 2 H100s each."""
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["physics-lab"]["dask"].update(gpu_workers=True, gpu_type="h100", worker_max_gpus=2)
    path = tmp / "demo-gpu-workers.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def wb(slurm):
    parent = Path(tempfile.mkdtemp(prefix="wb-it-slurm-", dir="/tmp"))
    parent.chmod(0o711)  # per-user processes traverse it
    w = Workbench(parent / "state", config=gpu_config(parent), extra_args=("--gateway-backend", "slurm"))
    w.start()
    try:
        token = w.new_token(w.login(USER), USER)
        yield w, token
    finally:
        code = w.stop()
        assert code == 0, w.output()
        assert w.leftovers() == []
        wait_no_jobs()
    shutil.rmtree(parent, ignore_errors=True)  # kept (with the hub log) when something failed


def test_researcher_cluster_runs_as_slurm_jobs_of_their_account_with_group_placement(wb):
    w, token = wb
    assert squeue() == [], f"{USER_PREFIX}researcher already has Slurm jobs; cancel them first"
    gw = w.gateway(token)
    cluster = gw.new_cluster(worker_cores=1, worker_memory=1.0)
    try:
        cluster.scale(2)
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=90)

        jobs = {j["id"]: j for j in squeue()}
        names = sorted(j["name"] for j in jobs.values())
        assert names == ["dask-scheduler", "dask-worker", "dask-worker"], jobs
        for j in jobs.values():  # demo.yaml: physics-lab -> partition cpu, account physics-lab, walltime 4h
            assert (j["partition"], j["account"], j["time"], j["user"], j["state"]) == (
                "cpu",
                "physics-lab",
                "4:00:00",
                UNIX_USER,
                "RUNNING",
            ), j
            assert j["gres"] == "N/A" and j["cpus"] == "1", j
            assert j["memory"] in ("1G", "1024M"), j

        # the workers are those jobs, and run as the user's account
        info = client.run(lambda: (__import__("getpass").getuser(), __import__("os").environ.get("SLURM_JOB_ID")))
        assert {user for user, _ in info.values()} == {UNIX_USER}
        worker_jobs = {job for _, job in info.values()}
        assert worker_jobs == {i for i, j in jobs.items() if j["name"] == "dask-worker"}
        detail = scontrol_job(sorted(worker_jobs)[0])
        assert detail["UserId"].startswith(f"{UNIX_USER}(")
        assert (detail["Partition"], detail["Account"], detail["TimeLimit"]) == ("cpu", "physics-lab", "04:00:00")
        assert detail["JobState"] == "RUNNING"

        import dask.array as da
        import xarray as xr

        data = np.arange(24 * 10 * 8, dtype=float).reshape(24, 10, 8)
        arr = xr.DataArray(
            da.from_array(data, chunks=(6, 10, 8)), dims=("time", "lat", "lon"), coords={"time": np.arange(24) % 12}
        )
        monthly = arr.groupby("time").mean().mean("lon").compute()
        expected = np.stack([data[[m, m + 12]].mean(axis=0).mean(axis=-1) for m in range(12)])
        np.testing.assert_allclose(monthly.values, expected)
        # by hand: month 0, lat 0 = mean of rows 0..7 (3.5) and 960..967 (963.5); sum of 0..1919
        assert monthly.values[0, 0] == 483.5 and monthly.shape == (12, 10)
        assert float(arr.sum().compute()) == 1919 * 1920 / 2
        client.close()
    finally:
        cluster.shutdown()
    assert gw.list_clusters() == []
    gw.close()
    wait_no_jobs()


def test_gpu_worker_gets_gres_in_the_gpu_partition(wb):
    w, token = wb
    gw = w.gateway(token)
    cluster = gw.new_cluster(worker_cores=1, worker_memory=0.5, worker_gpus=2)
    try:
        cluster.scale(1)
        client = cluster.get_client()
        client.wait_for_workers(1, timeout=90)
        jobs = {j["name"]: j for j in squeue()}
        assert set(jobs) == {"dask-scheduler", "dask-worker"}, jobs
        scheduler, worker = jobs["dask-scheduler"], jobs["dask-worker"]
        # the scheduler needs no GPU: the group's partition, no GRES
        assert (scheduler["partition"], scheduler["gres"]) == ("cpu", "N/A"), scheduler
        # the worker: GRES of the group's gpu_type, in the gpu partition of scripts/slurm-up.sh
        assert worker["partition"] == "gpu", worker
        assert worker["gres"] in ("gres:gpu:h100:2", "gpu:h100:2"), worker
        assert (worker["account"], worker["time"]) == ("physics-lab", "4:00:00"), worker
        assert "gpu:h100:2" in scontrol_job(worker["id"])["TresPerNode"]

        [seen] = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES")).values()
        assert seen == "0,1"  # Slurm gave the worker two of the node's four pretend H100s
        assert client.submit(sum, [1, 2, 3]).result() == 6
        client.close()
    finally:
        cluster.shutdown()
    gw.close()
    wait_no_jobs()


def test_gpu_request_above_the_group_limit_is_refused_before_any_job(wb):
    w, token = wb
    with w.gateway(token) as gw, pytest.raises(Exception, match="worker_gpus must be <= 2"):
        gw.new_cluster(worker_gpus=3)
    assert squeue() == []


@pytest.mark.parametrize(
    "name, value",
    [("SBATCH_EXCLUSIVE", "1"), ("SLURM_CONF", "/tmp/mine.conf"), ("SRUN_CPUS_PER_TASK", "64"), ("SALLOC_QOS", "x")],
)
def test_batch_system_variables_in_the_environment_option_are_refused_before_any_job(wb, name, value):
    """sbatch runs with the cluster's environment and reads SBATCH_* as options (SBATCH_EXCLUSIVE=1 would
    take the whole node while the quota charges one core): the gateway refuses them with 422."""
    w, token = wb
    requests = pytest.importorskip("requests")
    r = requests.post(
        f"{w.url}/services/dask-gateway/api/v1/clusters/",
        headers={"Authorization": f"jupyterhub {token}"},
        json={"cluster_options": {"environment": {name: value}}},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert f"environment: {name} would steer the batch system" in r.text
    assert squeue() == []
