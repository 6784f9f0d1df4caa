#!/usr/bin/env python
"""Benchmark supercomputer mode: login -> server ready with notebook servers as Slurm jobs.

Two hubs on the same one-node Slurm (scripts/slurm-up.sh, /etc/slurm/slurm.conf), both running the
server as a Slurm job of the Unix account ``wb-researcher`` with the same resources (1 core, 512 MiB,
partition cpu, time limit 2 h) and the same single-user command (``batchspawner-singleuser
jupyterhub-singleuser``, default URL /lab):

  workbench  `workbench up --spawner slurm --gateway-backend slurm` with a demo policy whose group
             physics-lab has the profile `tiny` (1 core, 512Mi, session max_age 2h, slurm partition cpu):
             WorkbenchSlurmSpawner (policy, quota admission before sbatch, job state from `scontrol
             show job`, accounting from Slurm's StartTime), user `researcher` (runs as wb-researcher).
  stock      JupyterHub from a generated minimal config: DummyAuthenticator, stock
             `batchspawner.SlurmSpawner` (its own batch script with `srun`, `squeue` polling,
             `sudo -E -u`, all upstream's defaults), req_partition=cpu, req_nprocs=1, req_memory=512M, req_runtime=02:00:00;
             hub user `wb-researcher` (the same account). No Workbench code.

One metric: the time from the login form's POST until `GET /user/<u>/api/status` answers 200 through the
proxy (login, token, `POST /hub/api/users/<u>/server`, poll until ready, status: the same code as
bench_embedded.py's login runs). Both hubs run at once and the runs alternate (workbench, stock,
workbench, ...), so load on this shared machine hits both sides alike; each server is stopped, and its job
gone from squeue, before the next run. Prints each run, the medians (min-max) and the ratio
workbench / stock; writes benchmarks/slurm_spawn.png (every run, by side) and, with --json, the raw times.

Run as root with the project's venv, after `make slurm`:
    .venv/bin/python benchmarks/bench_slurm_spawn.py [--runs 5] [--json FILE] [--png FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_embedded import STOCK_CONFIG, StockHub, login_to_ready, stop_server  # noqa: E402

from tests.integration.harness import DEMO, PASSWORD, VENV_BIN, Workbench, free_port  # noqa: E402

UNIX_USER = "wb-researcher"
T_START = time.monotonic()

#: the stock hub: bench_embedded's minimal config with stock batchspawner instead of the local spawner
STOCK_SLURM = (
    STOCK_CONFIG.replace(
        'c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"\n'
        'c.SimpleLocalProcessSpawner.home_dir_template = "{state}/homes/{{username}}"\n',
        'c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"\n',
    )
    + """
c.SlurmSpawner.batchspawner_singleuser_cmd = {batch_singleuser!r}
c.SlurmSpawner.req_partition = "cpu"
c.SlurmSpawner.req_nprocs = "1"
c.SlurmSpawner.req_memory = "512M"
c.SlurmSpawner.req_runtime = "02:00:00"
c.Spawner.start_timeout = 300
"""
)


def say(msg: str) -> None:
    print(f"[bench {time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


class StockSlurmHub(StockHub):
    """bench_embedded's stock hub, spawning with stock ``batchspawner.SlurmSpawner``."""

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o711)
        cfg = self.state_dir / "jupyterhub_config.py"
        cfg.write_text(
            STOCK_SLURM.format(
                port=self.port,
                hub_port=free_port(),
                proxy_api_port=free_port(),
                state=self.state_dir,
                password=PASSWORD,
                singleuser=str(VENV_BIN / "jupyterhub-singleuser"),
                args=[],
                proxy=str(VENV_BIN / "configurable-http-proxy"),
                batch_singleuser=str(VENV_BIN / "batchspawner-singleuser"),
            )
        )
        if "batchspawner.SlurmSpawner" not in cfg.read_text():
            raise RuntimeError("the stock config did not take the Slurm spawner (bench_embedded's config changed)")
        return cfg


def policy(path: Path) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["profiles"]["tiny"] = {"cpu": 1, "memory": "512Mi", "image": "base"}
    lab = data["groups"]["physics-lab"]
    lab["profiles"] = ["tiny"]
    lab["session"] = {"max_age": "2h"}
    lab["slurm"] = {"partition": "cpu"}
    path.write_text(yaml.safe_dump(data))
    return path


def squeue_user() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    res = subprocess.run(["squeue", "-h", "-u", UNIX_USER, "-o", "%i"], capture_output=True, text=True, env=env)
    return res.stdout.split()


def wait_no_jobs(timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while squeue_user():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs of {UNIX_USER} left: {squeue_user()}")
        time.sleep(0.2)


def one_run(name: str, url: str, user: str, log_tail) -> dict:
    res = login_to_ready(url, user, PASSWORD, log_tail)
    token = res.pop("token")
    jobs = squeue_user()
    say(
        f"{name:9} {res['total_s']:6.2f}s  (login POST {res['login_post_s']:.2f}, token {res['token_s']:.2f}, "
        f"server POST {res['spawn_request_s']:.2f}, until ready {res['until_ready_s']:.2f}, "
        f"status 200 {res['status_200_s']:.2f}) job {','.join(jobs)}"
    )
    if len(jobs) != 1:
        raise RuntimeError(f"{name}: expected one job of {UNIX_USER}, squeue shows {jobs}")
    stop_server(url, token, user)
    wait_no_jobs()
    return res


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def plot(samples: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, values) in enumerate(samples.items()):
        ax.scatter([i] * len(values), values, alpha=0.7, label=f"{name} (n={len(values)})")
        ax.hlines(statistics.median(values), i - 0.25, i + 0.25, colors="black")
        ax.annotate(f"median {statistics.median(values):.2f} s", (i + 0.28, statistics.median(values)), va="center")
    ax.set_xticks(range(len(samples)), list(samples))
    ax.set_xlim(-0.6, len(samples) - 0.1)
    ax.set_ylim(0, max(max(v) for v in samples.values()) * 1.15)
    ax.set_ylabel("login -> server ready (s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per side (default: %(default)s)")
    p.add_argument("--json", help="write the raw times here")
    p.add_argument("--png", default=str(HERE / "slurm_spawn.png"), help="the figure (default: %(default)s)")
    p.add_argument("--keep-state", action="store_true", help="keep the state folders (logs) at the end")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("sbatch"):
        print("bench_slurm_spawn: needs root and Slurm (run `make slurm` first); skipped", file=sys.stderr)
        return 0
    parent = Path(tempfile.mkdtemp(prefix="wb-bench-slurmspawn-", dir="/tmp"))
    parent.chmod(0o711)
    wb = Workbench(
        parent / "state",
        config=policy(parent / "platform.yaml"),
        extra_args=("--spawner", "slurm", "--gateway-backend", "slurm"),
    )
    stock = StockSlurmHub(parent / "stock")
    times: dict[str, list[float]] = {"workbench": [], "stock batchspawner": []}
    raw: dict[str, list[dict]] = {"workbench": [], "stock batchspawner": []}
    ok = False
    try:
        wait_no_jobs()
        t = time.monotonic()
        wb.start()
        say(f"workbench up (--spawner slurm) ready in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        stock.start()
        say(f"stock JupyterHub + batchspawner.SlurmSpawner ready in {time.monotonic() - t:.1f}s")
        sides = [
            ("workbench", wb.url, "researcher", lambda: wb.hub_log()[-3000:]),
            ("stock batchspawner", stock.url, UNIX_USER, lambda: stock.output()[-3000:]),
        ]
        for i in range(args.runs):
            for name, url, user, tail in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
                res = one_run(name, url, user, tail)
                raw[name].append(res)
                times[name].append(res["total_s"])
        ok = True
    finally:
        code_wb = wb.stop()
        code_stock = stock.stop()
        say(f"stopped (workbench exit {code_wb}, stock hub exit {code_stock})")
        if ok and not args.keep_state:
            shutil.rmtree(parent, ignore_errors=True)
        else:
            say(f"state and logs kept in {parent}")
    s = {name: summary(v) for name, v in times.items()}
    ratio = s["workbench"]["median"] / s["stock batchspawner"]["median"]
    print()
    print("| login -> server ready (Slurm job) | median | min | max | runs |")
    print("|---|---|---|---|---|")
    for name, v in s.items():
        print(f"| {name} | {v['median']:.2f} s | {v['min']:.2f} s | {v['max']:.2f} s | {v['n']} |")
    print(f"\nratio workbench / stock (medians): {ratio:.2f}")
    load = os.getloadavg()
    title = (
        f"login -> server ready, notebook server as a Slurm job (one-node Slurm, {os.cpu_count()} cores, "
        f"load {load[0]:.1f})\nworkbench / stock batchspawner = {ratio:.2f} (medians)"
    )
    plot(times, Path(args.png), title)
    say(f"figure: {args.png}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "raw": raw,
                    "summary": s,
                    "ratio": ratio,
                    "machine": {"cpus": os.cpu_count(), "load": load, "python": platform.python_version()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
