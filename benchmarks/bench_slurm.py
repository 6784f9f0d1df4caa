#!/usr/bin/env python
"""Benchmark Dask on Slurm: the workbench's Dask Gateway (Slurm backend) against dask-jobqueue.

Both sides run Dask workers as Slurm batch jobs on the same cluster (the one-node Slurm of
scripts/slurm-up.sh at /etc/slurm/slurm.conf; $SLURM_CONF is ignored so both sides use it), with
the same worker jobs: 1 core, 1 GiB, 1 thread, partition cpu, account physics-lab, walltime 4h.

  gateway    `workbench up --gateway-backend slurm` with hub_config/demo.yaml, demo user
             researcher (group physics-lab). Through the hub's proxy with the user's hub token:
             gateway.new_cluster(worker_cores=1, worker_memory=1.0); cluster.scale(N);
             cluster.get_client().wait_for_workers(N). The scheduler is a Slurm job too; every
             job runs as wb-researcher (submitted through sudo); comms are TLS.
  jobqueue   dask_jobqueue.SLURMCluster(cores=1, processes=1, memory="1GiB", queue="cpu",
             account="physics-lab", walltime="04:00:00") started directly in this process, then
             cluster.scale(N); Client(cluster).wait_for_workers(N). The scheduler runs in this
             process (not a job); the worker jobs run as the user running the benchmark; comms
             are plain TCP.

Two metrics per run, each side on its own (the gateway's runs, then the workbench is stopped,
then the jobqueue runs):

  create -> N workers   from the cluster request until wait_for_workers(N) returns
  xarray reduction      monthly means of a (1461 days x 180 x 360) float64 field (~760 MB,
                        146-day chunks) made on the workers, then averaged over lat/lon:
                        arr.groupby("time.month").mean().mean(("lat", "lon")).compute();
                        the 12 numbers are checked against numpy

Before each cluster is shut down, a per-worker timeline of its start (benchmarks/slurm_timeline.py: sbatch,
Slurm submit/start, job script, python exec, imports done, worker process, registered) is read from the
running cluster; the medians are printed at the end and kept in --json.

Each cluster is shut down between runs (untimed), and the next run waits until Slurm shows none
of its jobs. Prints each run, then medians (min-max) and the ratio gateway / jobqueue.

Run as root with the project's venv, after `make slurm`:
    .venv/bin/python benchmarks/bench_slurm.py [--runs 3] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from slurm_timeline import JobqueueSubmits, collect, gateway_submits, print_timeline  # noqa: E402

from tests.integration.harness import VENV_BIN, Workbench  # noqa: E402

USER = "researcher"  # demo user of hub_config/demo.yaml, group physics-lab (up to 4 workers)
UNIX_USER = "wb-researcher"
JOBQUEUE_JOB_NAME = "dask-jobqueue-bench"
NDAYS, NLAT, NLON, CHUNK_DAYS = 1461, 180, 360, 146
T_START = time.monotonic()


def say(msg: str) -> None:
    print(f"[bench {time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


# -- Slurm ------------------------------------------------------------------------------------


def squeue(*args: str) -> list[str]:
    res = subprocess.run(["squeue", "-h", "-o", "%i", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"squeue failed: {res.stderr.strip()}")
    return res.stdout.split()


def wait_no_jobs(*args: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while squeue(*args):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm jobs left after {timeout:.0f}s (squeue {' '.join(args)}): {squeue(*args)}")
        time.sleep(0.2)


def check_slurm() -> str | None:
    if os.geteuid() != 0:
        return "run as root: the gateway's Slurm backend submits jobs as per-user accounts through sudo"
    if shutil.which("sinfo") is None:
        return "Slurm is not installed: run `make slurm` (scripts/slurm-up.sh) first"
    res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if res.returncode != 0 or not any(
        s.startswith(("idle", "mix", "alloc")) and "*" not in s for s in res.stdout.split()
    ):
        return f"Slurm does not answer or has no usable node ({res.stderr.strip() or res.stdout.strip()}): run `make slurm`"
    return None


# -- the measured work ------------------------------------------------------------------------


def reduction(client) -> float:
    """The xarray reduction on the client's cluster; returns its wall time (checked)."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import xarray as xr

    times = pd.date_range("2000-01-01", periods=NDAYS, freq="D")
    t0 = time.perf_counter()
    day = da.arange(NDAYS, chunks=CHUNK_DAYS, dtype=float)
    field = da.ones((NDAYS, NLAT, NLON), chunks=(CHUNK_DAYS, NLAT, NLON)) * day[:, None, None]
    arr = xr.DataArray(field, dims=("time", "lat", "lon"), coords={"time": times})
    monthly = arr.groupby("time.month").mean().mean(("lat", "lon")).compute()
    elapsed = time.perf_counter() - t0
    expected = pd.Series(np.arange(NDAYS, dtype=float)).groupby(times.month).mean().to_numpy()
    np.testing.assert_allclose(monthly.values, expected)
    return elapsed


def gateway_runs(wb: Workbench, token: str, runs: int, workers: int) -> list[dict]:
    out = []
    for i in range(runs):
        gw = wb.gateway(token)
        t0 = time.perf_counter()
        cluster = gw.new_cluster(worker_cores=1, worker_memory=1.0)
        try:
            t_cluster = time.perf_counter() - t0
            t_scale = time.time()
            cluster.scale(workers)
            client = cluster.get_client()
            client.wait_for_workers(workers, timeout=180)
            ready = time.perf_counter() - t0
            timeline = collect(client, t_scale, gateway_submits(wb.hub_log()))
            reduce_s = reduction(client)
            client.close()
        finally:
            cluster.shutdown()
            gw.close()
            # dask-gateway 2026.3's Gateway.__del__ closes a second time and raises ("Accessing the
            # loop property while the loop is not running"): harmless noise, so stop it
            for g in (gw, cluster.gateway):
                g.__dict__.pop("_loop_runner", None)
        wait_no_jobs("-u", UNIX_USER)
        out.append({"ready_s": ready, "new_cluster_s": t_cluster, "reduction_s": reduce_s, "timeline": timeline})
        say(
            f"gateway   run {i + 1}/{runs}: {workers} workers ready {ready:6.2f}s (new_cluster {t_cluster:.2f}s), "
            f"reduction {reduce_s:6.2f}s"
        )
    return out


def jobqueue_runs(runs: int, workers: int, log_dir: Path) -> list[dict]:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    out = []
    me = str(os.getuid())
    submits = JobqueueSubmits().install()
    for i in range(runs):
        t0 = time.perf_counter()
        cluster = SLURMCluster(
            cores=1,
            processes=1,
            memory="1GiB",
            queue="cpu",
            account="physics-lab",
            walltime="04:00:00",
            job_name=JOBQUEUE_JOB_NAME,
            python=str(VENV_BIN / "python"),
            log_directory=str(log_dir),
            scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        )
        try:
            t_cluster = time.perf_counter() - t0
            t_scale = time.time()
            cluster.scale(workers)
            client = Client(cluster)
            client.wait_for_workers(workers, timeout=180)
            ready = time.perf_counter() - t0
            timeline = collect(client, t_scale, submits.submitted)
            reduce_s = reduction(client)
            client.close()
        finally:
            cluster.close()
        wait_no_jobs("-u", me, "-n", JOBQUEUE_JOB_NAME)
        out.append({"ready_s": ready, "new_cluster_s": t_cluster, "reduction_s": reduce_s, "timeline": timeline})
        say(
            f"jobqueue  run {i + 1}/{runs}: {workers} workers ready {ready:6.2f}s (SLURMCluster {t_cluster:.2f}s), "
            f"reduction {reduce_s:6.2f}s"
        )
    return out


# -- report -----------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def print_table(results: dict, workers: int) -> None:
    rows = [("ready_s", f"create -> {workers} workers"), ("reduction_s", "xarray reduction")]
    print()
    print(
        f"{'metric (seconds)':<24}  {'gateway (Slurm backend)':>24}  {'dask-jobqueue SLURMCluster':>27}  {'ratio':>6}"
    )
    for key, label in rows:
        g, j = results[key]["gateway"], results[key]["jobqueue"]
        cell = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
        print(f"{label:<24}  {cell(g):>24}  {cell(j):>27}  {results[key]['ratio_median']:>6.2f}")
    print("median (min-max) of each side's runs; ratio = gateway / jobqueue (medians)")
    print()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dask", "distributed", "xarray", "dask-gateway-server", "dask-jobqueue"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    res = subprocess.run(["sinfo", "--version"], capture_output=True, text=True)
    out["slurm"] = res.stdout.strip()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_slurm.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per side (default 3)")
    p.add_argument("--workers", type=int, default=2, help="workers per cluster, 1-4 (physics-lab's limit; default 2)")
    p.add_argument("--json", metavar="FILE", help="write raw timings, summaries and ratios to FILE")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder under /tmp")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 1 <= args.workers <= 4:
        p.error("--workers must be between 1 and 4 (the demo group physics-lab allows 4 workers)")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_slurm()
    if problem:
        print(f"bench_slurm: {problem}", file=sys.stderr)
        return 2
    if not (VENV_BIN / "workbench").exists():
        print(f"run this with the project's venv (.venv/bin/python); {VENV_BIN} has no workbench", file=sys.stderr)
        return 2
    os.environ.pop("SLURM_CONF", None)  # both sides on the cluster at the default path
    signal.signal(signal.SIGTERM, _raise_interrupt)

    root = Path(tempfile.mkdtemp(prefix="wb-bench-slurm-", dir="/tmp"))
    root.chmod(0o711)  # per-user processes traverse it
    say(f"state folder {root}; {args.runs} run(s) per side, {args.workers} workers; {os.cpu_count()} CPUs")
    raw: dict = {"gateway": [], "jobqueue": []}
    wb: Workbench | None = None
    ok = False
    start_s = None
    try:
        wb = Workbench(root / "state", extra_args=("--gateway-backend", "slurm"))
        say("starting `workbench up --gateway-backend slurm` …")
        t0 = time.perf_counter()
        wb.start()
        start_s = time.perf_counter() - t0
        say(f"workbench ready at {wb.url} after {start_s:.2f}s")
        token = wb.new_token(wb.login(USER), USER)
        raw["gateway"] = gateway_runs(wb, token, args.runs, args.workers)
        say("stopping the workbench …")
        code = wb.stop()
        if code != 0 or wb.leftovers():
            say(f"warning: workbench up exited with {code}; leftovers: {wb.leftovers()}")
        wb = None
        log_dir = root / "jobqueue-logs"
        log_dir.mkdir()
        raw["jobqueue"] = jobqueue_runs(args.runs, args.workers, log_dir)
        ok = True
    except KeyboardInterrupt:
        say("interrupted; stopping everything …")
    finally:
        if wb is not None:
            wb.stop()
        if ok and not args.keep_state:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"state and logs kept in {root}")
    if not ok:
        return 130

    results: dict = {}
    for key in ("ready_s", "new_cluster_s", "reduction_s"):
        g = summary([r[key] for r in raw["gateway"]])
        j = summary([r[key] for r in raw["jobqueue"]])
        results[key] = {"gateway": g, "jobqueue": j, "ratio_median": g["median"] / j["median"]}
    results["runs"] = raw
    results["workbench_start_s"] = start_s
    results["meta"] = {
        "runs": args.runs,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.monotonic() - T_START,
    }
    print_table(results, args.workers)
    results["timeline_medians"] = print_timeline({side: [r["timeline"] for r in raw[side]] for side in raw})
    say(f"`workbench up` took {start_s:.2f}s to start (not in the table); done in {results['meta']['wall_s']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
