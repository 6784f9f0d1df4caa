#!/usr/bin/env python
"""Benchmark the embedded workbench (`workbench up`) against stock JupyterHub and plain Dask.

Three metrics, each measured side by side in one run on this machine:

  login   login -> server ready. Log in through the login form (GET /hub/login for the _xsrf
          field, untimed; then the timed POST /hub/login), create an API token, POST
          /hub/api/users/<user>/server, poll GET /hub/api/users/<user> until the server is
          ready, then GET /user/<user>/api/status through the proxy until it answers 200.
          The time is from the login POST to that 200. The server is stopped (and the stop
          waited for) between runs. Same user ("researcher") for every run on both hubs.
            workbench: `workbench up` with hub_config/demo.yaml (demo auth, WorkbenchLocalSpawner,
                       per-user Unix accounts when root, Dask Gateway + idle culler services)
            stock:     JupyterHub started directly from a generated minimal config:
                       DummyAuthenticator with a password, allow_all, SimpleLocalProcessSpawner,
                       configurable-http-proxy, sqlite, Spawner.cmd = jupyterhub-singleuser,
                       default_url /lab, no Workbench code at all.

  dask    cluster create -> 2 workers ready.
            workbench: through the workbench's Dask Gateway (via the hub's proxy, with the
                       user's hub token): gateway.new_cluster(); cluster.scale(2);
                       cluster.get_client().wait_for_workers(2)
            stock:     distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
                       in this process, then Client(cluster).wait_for_workers(2)
          Each cluster is shut down (and its processes waited for) between runs.

  quota   login -> server ready (as for `login`) with the quota service on (every start is
          admitted by it: budgets and caps in one database transaction) vs `workbench up
          --no-quota` (no admission); the cost of enforcement at spawn.

Order: the workbench is started once and does all its runs (login, then dask) and is stopped;
then `workbench up --no-quota` does its login runs and is stopped; then the stock hub is started once, does its login runs and is stopped; then the LocalCluster
runs. So each measurement runs with only its own system alive. Hub start-up time is recorded
too (one sample each; the workbench's includes its Dask Gateway).

Everything started is stopped at the end, also on Ctrl-C, SIGTERM or an error. State lives in
a temporary folder under /tmp (mode 0711 so per-user processes can traverse it), removed at
the end unless --keep-state is given or something failed.

Run with the project's venv:  .venv/bin/python benchmarks/bench_embedded.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import PASSWORD, VENV_BIN, Workbench, free_port  # noqa: E402

USER = "researcher"  # a demo user of hub_config/demo.yaml whose group may use Dask
POLL = 0.1  # seconds between readiness polls (same on both sides)
READY_TIMEOUT = 180.0
T_START = time.monotonic()


def say(msg: str) -> None:
    print(f"[bench {time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


def make_state_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o711)
    return d


# -- process bookkeeping ----------------------------------------------------------------


class Tracker:
    """Remembers (pid, create_time) of every descendant of a root process, to kill leftovers."""

    def __init__(self, root_pid: int | None = None):
        self.root_pid = root_pid or os.getpid()
        self.seen: dict[int, float] = {}

    def snapshot(self) -> None:
        try:
            kids = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return
        for p in kids:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def kill_leftovers(self) -> int:
        killed = 0
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = self.alive()
            if not procs:
                break
            killed = max(killed, len(procs))
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
        return killed


# -- the stock hub ------------------------------------------------------------------------

STOCK_CONFIG = """\
# Minimal stock JupyterHub for benchmarks/bench_embedded.py (no Workbench code).
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{state}/jupyterhub.pid"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
c.JupyterHub.authenticator_class = "jupyterhub.auth.DummyAuthenticator"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{state}/homes/{{username}}"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {args!r}
c.Spawner.default_url = "/lab"
# the workbench's timeouts (they only matter for failures, not for latency)
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 90
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.ConfigurableHTTPProxy.should_start = True
"""


class StockHub:
    """A stock JupyterHub on free ports, started directly with a generated minimal config."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.tracker: Tracker | None = None
        self.log_path = self.state_dir / "hub.log"
        self._log = None

    def write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o711)
        (self.state_dir / "homes").mkdir(exist_ok=True)
        cfg = self.state_dir / "jupyterhub_config.py"
        cfg.write_text(
            STOCK_CONFIG.format(
                port=self.port,
                hub_port=free_port(),
                proxy_api_port=free_port(),
                state=self.state_dir,
                password=PASSWORD,
                singleuser=str(VENV_BIN / "jupyterhub-singleuser"),
                # SimpleLocalProcessSpawner does not switch users; jupyter-server refuses root without this
                args=["--allow-root"] if os.geteuid() == 0 else [],
                proxy=str(VENV_BIN / "configurable-http-proxy"),
            )
        )
        return cfg

    def start(self, timeout: float = 180) -> StockHub:
        cfg = self.write_config()
        env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", str(cfg)],
            cwd=self.state_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tracker = Tracker(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tracker.snapshot()
            if self.proc.poll() is not None:
                raise RuntimeError(f"stock jupyterhub exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if requests.get(f"{self.url}/hub/health", timeout=2).status_code == 200:
                    self.tracker.snapshot()
                    return self
            except requests.RequestException:
                pass
            time.sleep(POLL)
        raise TimeoutError(f"stock jupyterhub not ready after {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def snapshot(self) -> None:
        if self.tracker:
            self.tracker.snapshot()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the hub (it stops its servers and proxy), then kill anything it left behind."""
        code = 0
        if self.proc is not None and self.proc.poll() is None:
            self.snapshot()
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self.tracker:
            killed = self.tracker.kill_leftovers()
            if killed:
                say(f"stock hub: killed {killed} leftover process(es)")
        if self._log:
            self._log.close()
            self._log = None
        return code


# -- one login -> server-ready run (identical code for both hubs) ------------------------


def login_to_ready(url: str, user: str, password: str, log_tail) -> dict:
    """Log in through the form, make a token, start the server, wait until /api/status is 200."""
    s = requests.Session()
    r = s.get(f"{url}/hub/login", timeout=30)
    r.raise_for_status()
    m = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text)
    if not m:
        raise RuntimeError("login form has no _xsrf field")
    xsrf_field = m.group(1)

    t0 = time.perf_counter()
    r = s.post(
        f"{url}/hub/login",
        data={"username": user, "password": password, "_xsrf": xsrf_field},
        allow_redirects=False,
        timeout=60,
    )
    if r.status_code != 302:
        raise RuntimeError(f"login as {user} answered {r.status_code}, not 302")
    t_login = time.perf_counter()

    r = s.post(
        f"{url}/hub/api/users/{user}/tokens",
        json={"note": "benchmark"},
        headers={"X-XSRFToken": s.cookies.get("_xsrf", path="/hub/") or ""},
        timeout=60,
    )
    if r.status_code not in (200, 201):
        raise RuntimeError(f"token creation answered {r.status_code}: {r.text[:500]}")
    token = r.json()["token"]
    auth = {"Authorization": f"token {token}"}
    t_token = time.perf_counter()

    r = requests.post(f"{url}/hub/api/users/{user}/server", headers=auth, timeout=60)
    if r.status_code not in (201, 202):
        raise RuntimeError(f"server start answered {r.status_code}: {r.text[:500]}")
    t_requested = time.perf_counter()

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        model = requests.get(f"{url}/hub/api/users/{user}", headers=auth, timeout=60).json()
        server = (model.get("servers") or {}).get("")
        if server and server.get("ready"):
            break
        if not server and time.perf_counter() - t_requested > 5:
            raise RuntimeError(f"server of {user} failed to start: {model}\n{log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server of {user} not ready after {READY_TIMEOUT:.0f}s\n{log_tail()}")
        time.sleep(POLL)
    t_ready = time.perf_counter()

    while True:
        try:
            r = requests.get(f"{url}/user/{user}/api/status", headers=auth, timeout=30, allow_redirects=False)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"/user/{user}/api/status not 200 after {READY_TIMEOUT:.0f}s\n{log_tail()}")
        time.sleep(POLL)
    t_status = time.perf_counter()

    return {
        "total_s": t_status - t0,
        "login_post_s": t_login - t0,
        "token_s": t_token - t_login,
        # the hub answers the server POST once the spawn is done or after slow_spawn_timeout (10 s)
        "spawn_request_s": t_requested - t_token,
        "until_ready_s": t_ready - t_requested,
        "status_200_s": t_status - t_ready,
        "token": token,
    }


def stop_server(url: str, token: str, user: str, timeout: float = 90) -> None:
    auth = {"Authorization": f"token {token}"}
    r = requests.delete(f"{url}/hub/api/users/{user}/server", headers=auth, timeout=60)
    if r.status_code not in (202, 204):
        raise RuntimeError(f"server stop answered {r.status_code}: {r.text[:500]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = requests.get(f"{url}/hub/api/users/{user}", headers=auth, timeout=60).json()
        if not model.get("servers"):
            return
        time.sleep(POLL)
    raise TimeoutError(f"server of {user} did not stop within {timeout:.0f}s")


def wait_singleuser_gone(root_pid: int, timeout: float = 30) -> None:
    """Wait until no jupyterhub-singleuser process below root_pid is left (the stop really finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = psutil.Process(root_pid).children(recursive=True)
        except psutil.Error:
            return
        busy = []
        for p in kids:
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "jupyterhub-singleuser" in " ".join(p.cmdline()):
                    busy.append(p)
            except psutil.Error:
                pass
        if not busy:
            return
        time.sleep(POLL)


_LOG_TIME = r"\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)"
SPAWN_MARKS = (
    ("process spawned", r"Spawning \S*jupyterhub-singleuser"),
    ("JupyterLab's first log line", r"ServerApp\]"),
    ("JupyterLab listening", r"Jupyter Server [\d.]+ is running at"),
    ("hub noticed it", r"took [\d.]+ seconds to start"),
)


def spawn_timeline(log: str) -> list[tuple[str, float]]:
    """The last server start in a hub log (the server's output goes there too): seconds of each step after the
    spawn began (the hub's "took N seconds to start" minus N). Empty if the log lacks the lines."""
    begin = max((m.start() for m in re.finditer(SPAWN_MARKS[0][1], log)), default=-1)
    took = re.search(r"took ([\d.]+) seconds to start", log[begin:]) if begin >= 0 else None
    if took is None:
        return []
    line_start = log.rfind("\n", 0, begin) + 1
    steps, pos = [], line_start
    for label, pattern in SPAWN_MARKS:
        m = re.search(_LOG_TIME + r".*" + pattern, log[pos:])
        if m is None:
            return []
        steps.append((label, _stamp(m.group(1), "%Y-%m-%d %H:%M:%S.%f")))
        pos += m.start()
    t0 = steps[-1][1] - float(took.group(1))
    return [("start requested", 0.0)] + [(label, t - t0) for label, t in steps]


def login_runs(name: str, url: str, runs: int, root_pid: int, log_tail, snapshot, full_log=None) -> list[dict]:
    out = []
    for i in range(runs):
        res = login_to_ready(url, USER, PASSWORD, log_tail)
        snapshot()
        token = res.pop("token")
        say(
            f"{name:9} login run {i + 1}/{runs}: {res['total_s']:.2f}s  (login POST {res['login_post_s']:.2f}, "
            f"token {res['token_s']:.2f}, server POST {res['spawn_request_s']:.2f}, "
            f"until ready {res['until_ready_s']:.2f}, status 200 {res['status_200_s']:.2f})"
        )
        if full_log is not None and (steps := spawn_timeline(full_log())):
            res["timeline"] = steps
            say(f"{name:9}   timeline (hub log): " + ", ".join(f"{label} +{t:.2f}s" for label, t in steps))
        out.append(res)
        stop_server(url, token, USER)
        wait_singleuser_gone(root_pid)
    return out


# -- dask ---------------------------------------------------------------------------------


def wait_dask_gone(root_pid: int, timeout: float = 60) -> None:
    """Wait until no dask scheduler/worker process below root_pid is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = psutil.Process(root_pid).children(recursive=True)
        except psutil.Error:
            return
        busy = []
        for p in kids:
            try:
                cmd = " ".join(p.cmdline())
                if p.status() != psutil.STATUS_ZOMBIE and (
                    "dask scheduler" in cmd
                    or "dask worker" in cmd
                    or "dask-scheduler" in cmd
                    or "dask-worker" in cmd
                    or "spawn_main" in cmd  # not the long-lived resource_tracker
                ):
                    busy.append(p)
            except psutil.Error:
                pass
        if not busy:
            return
        time.sleep(POLL)
    say(f"warning: dask processes still alive {timeout:.0f}s after shutdown")


def _forget_loop(gateway) -> None:
    """After Gateway.close(): stop its __del__ from closing again.

    dask-gateway 2026.3's Gateway.__del__ calls close() a second time, which with this distributed
    raises "Accessing the loop property while the loop is not running" (printed as an ignored
    exception in __del__). Harmless, but noisy in the benchmark's output.
    """
    if gateway is not None:
        gateway.__dict__.pop("_loop_runner", None)


def xarray_reduction(client) -> float:
    """Wall time of a fixed xarray reduction on ``client``'s cluster: a monthly climatology of 4 years of
    daily data on a 2-degree grid (1461 x 90 x 180 float64, ~190 MB, chunks of 90 days); checked."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import xarray as xr

    time_ = pd.date_range("2001-01-01", periods=1461, freq="D")
    data = da.random.default_rng(0).normal(10.0, 1.0, (time_.size, 90, 180), chunks=(90, -1, -1))
    arr = xr.DataArray(data, dims=("time", "lat", "lon"), coords={"time": time_})
    t0 = time.perf_counter()
    clim = arr.groupby("time.month").mean("time").mean(("lat", "lon")).compute()
    took = time.perf_counter() - t0
    assert clim.sizes["month"] == 12 and np.allclose(clim.values, 10.0, atol=0.01), clim.values
    return took


# -- where the time of a gateway cluster goes ---------------------------------------------------

# (step, where it is logged, pattern) in the order they happen; {c} is the cluster's name
TIMELINE_STEPS = (
    ("gateway: cluster created", "gw", r"Created cluster {c} "),
    ("quota: scheduler admitted", "gw", r"Submitting cluster {c}\.\.\."),
    ("scheduler process started", "gw", r"Cluster {c} submitted"),
    ("scheduler listening", "sched", r"Scheduler at:"),
    ("gateway: cluster running", "gw", r"Cluster {c} is running"),
    ("client: new_cluster() returned", "client", "created"),
    ("gateway: scale request", "gw", r"POST /api/v1/clusters/{c}/scale"),
    ("gateway: workers created", "gw", r"Created worker \w+ for cluster {c}"),
    ("gateway: workers submitting (quota admission, then start)", "gw", r"Submitting worker"),
    ("worker processes started (admitted, spawned)", "gw", r"Worker \w+ submitted"),
    ("workers registered", "sched", r"Register worker"),
    ("client: wait_for_workers(2) returned", "client", "ready"),
)
_GW_TIME = re.compile(r"\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")
_DASK_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(text: str, fmt: str) -> float:
    from datetime import datetime

    return datetime.strptime(text, fmt).timestamp()  # local time, as both logs write it


def cluster_logs(wb: Workbench, name: str) -> str:
    """The cluster's scheduler log (read before the cluster is shut down: its folder goes with it)."""
    for folder in [wb.state_dir / "clusters" / name, *Path(tempfile.gettempdir()).glob(f"dask*{name}")]:
        log = folder / "logs" / "scheduler.log"
        if log.exists():
            return log.read_text(errors="replace")
    return ""


def timeline(hub_log: str, sched_log: str, name: str, t0_wall: float, client: dict) -> list[tuple[str, float]]:
    """Seconds from the client's request to the *last* occurrence of each step (the last worker, etc.)."""
    gw = []
    for line in hub_log.splitlines():
        m = _GW_TIME.search(line)
        if m and "DaskGateway" in line:
            gw.append((_stamp(m.group(1), "%Y-%m-%d %H:%M:%S.%f"), line))
    sched = []
    for line in sched_log.splitlines():
        m = _DASK_TIME.match(line)
        if m:
            sched.append((_stamp(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), line))
    worker_names = {
        re.search(r"Created worker (\w+)", line).group(1) for _, line in gw if f"for cluster {name}" in line
    }
    out = []
    for step, where, pattern in TIMELINE_STEPS:
        if where == "client":
            out.append((step, client[pattern]))
            continue
        rx = re.compile(pattern.format(c=name))
        lines = gw if where == "gw" else sched
        hits = [t for t, line in lines if rx.search(line)]
        if where == "gw" and "worker" in step.lower() and "created" not in step:
            hits = [t for t, line in lines if rx.search(line) and any(w in line for w in worker_names)]
        if hits:
            out.append((step, max(hits) - t0_wall))
    return out


def print_timeline(steps: list[tuple[str, float]]) -> None:
    prev = 0.0
    for step, t in steps:
        say(f"    {t:6.3f}s  (+{t - prev:5.3f})  {step}")
        prev = t


def gateway_runs(wb: Workbench, token: str, runs: int) -> list[dict]:
    out = []
    gw = wb.gateway(token)
    try:
        for i in range(runs):
            cluster = client = None
            try:
                t0_wall, t0 = time.time(), time.perf_counter()
                cluster = gw.new_cluster()
                t_created = time.perf_counter()
                cluster.scale(2)
                client = cluster.get_client()
                client.wait_for_workers(2, timeout=READY_TIMEOUT)
                t_ready = time.perf_counter()
                wb.snapshot()
                sched_log = cluster_logs(wb, cluster.name)
                reduce_s = xarray_reduction(client)
            finally:
                if client is not None:
                    client.close()
                if cluster is not None:
                    cluster.shutdown()
                    _forget_loop(getattr(cluster, "gateway", None))
            res = {
                "total_s": t_ready - t0,
                "create_s": t_created - t0,
                "workers_s": t_ready - t_created,
                "reduce_s": reduce_s,
            }
            time.sleep(0.5)  # the hub log is written by another process
            steps = timeline(
                wb.hub_log(),
                sched_log,
                cluster.name,
                t0_wall,
                {"created": res["create_s"], "ready": res["total_s"]},
            )
            res["timeline"] = dict(steps)
            say(
                f"workbench dask  run {i + 1}/{runs}: {res['total_s']:.2f}s  (new_cluster {res['create_s']:.2f}, "
                f"scale(2) -> 2 workers {res['workers_s']:.2f}); xarray reduction {reduce_s:.2f}s"
            )
            print_timeline(steps)
            out.append(res)
            wait_dask_gone(wb.proc.pid)
            deadline = time.monotonic() + 30
            while gw.list_clusters() and time.monotonic() < deadline:
                time.sleep(POLL)
    finally:
        gw.close()
        _forget_loop(gw)
    return out


def local_cluster_runs(runs: int) -> list[dict]:
    from distributed import Client, LocalCluster

    out = []
    for i in range(runs):
        cluster = client = None
        try:
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
            t_created = time.perf_counter()
            client = Client(cluster)
            client.wait_for_workers(2, timeout=READY_TIMEOUT)
            t_ready = time.perf_counter()
            reduce_s = xarray_reduction(client)
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
        res = {
            "total_s": t_ready - t0,
            "create_s": t_created - t0,
            "workers_s": t_ready - t_created,
            "reduce_s": reduce_s,
        }
        say(
            f"stock     dask  run {i + 1}/{runs}: {res['total_s']:.2f}s  (LocalCluster() {res['create_s']:.2f}, "
            f"then 2 workers {res['workers_s']:.2f}); xarray reduction {reduce_s:.2f}s"
        )
        out.append(res)
        wait_dask_gone(os.getpid())
    return out


# -- reporting ------------------------------------------------------------------------------


def summary(samples: list[dict], key: str = "total_s") -> dict:
    totals = [s[key] for s in samples if key in s]
    if not totals:
        return {}
    return {"median_s": statistics.median(totals), "min_s": min(totals), "max_s": max(totals), "n": len(totals)}


def ratio(a: dict, b: dict) -> float | None:
    if a.get("median_s") and b.get("median_s"):
        return a["median_s"] / b["median_s"]
    return None


def print_table(results: dict) -> None:
    rows = []
    labels = {
        "login": "login->server ready",
        "dask": "dask create->2 workers",
        "quota": "login->ready, quota on vs --no-quota",
    }
    for metric in ("login", "dask", "quota"):
        if metric not in results:
            continue
        wb, st = results[metric]["workbench"]["summary"], results[metric]["stock"]["summary"]
        r = results[metric]["ratio_median"]
        rows.append(
            (f"{labels[metric]} (median s)", f"{wb['median_s']:.2f}", f"{st['median_s']:.2f}", f"{r:.2f}" if r else "-")
        )
        rows.append(
            (
                f"{labels[metric]} (min-max s)",
                f"{wb['min_s']:.2f}-{wb['max_s']:.2f}",
                f"{st['min_s']:.2f}-{st['max_s']:.2f}",
                "",
            )
        )
        if metric == "dask":
            wr = summary(results[metric]["workbench"]["runs"], "reduce_s")
            sr = summary(results[metric]["stock"]["runs"], "reduce_s")
            if wr and sr:
                rows.append(
                    (
                        "xarray reduction, 2 workers (median s)",
                        f"{wr['median_s']:.2f}",
                        f"{sr['median_s']:.2f}",
                        f"{wr['median_s'] / sr['median_s']:.2f}",
                    )
                )
    starts = results.get("hub_start_s", {})
    if starts.get("workbench") is not None and starts.get("stock") is not None:
        rows.append(
            (
                "hub start (1 sample, s)*",
                f"{starts['workbench']:.2f}",
                f"{starts['stock']:.2f}",
                f"{starts['workbench'] / starts['stock']:.2f}",
            )
        )
    head = ("metric", "workbench", "stock", "ratio")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows))
    w = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in (1, 2, 3)]
    print()
    print(f"{head[0]:<{w0}}  {head[1]:>{w[0]}}  {head[2]:>{w[1]}}  {head[3]:>{w[2]}}")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>{w[0]}}  {r[2]:>{w[1]}}  {r[3]:>{w[2]}}")
    print(
        "ratio = workbench / stock (medians); stock login = plain JupyterHub, stock dask = LocalCluster, "
        "stock quota = the workbench with --no-quota (no admission check at spawn)"
    )
    if starts:
        print(
            "* hub start: `workbench up` until ready (includes its Dask Gateway) vs stock jupyterhub until /hub/health"
        )
    print()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jupyterhub", "jupyter_server", "jupyterlab", "dask", "distributed", "dask-gateway-server"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_embedded.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs per side and metric (default 5)")
    p.add_argument("--json", metavar="FILE", help="write raw timings, medians and ratios to FILE")
    p.add_argument("--only", choices=("login", "dask", "quota"), help="measure only one metric")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder under /tmp")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (VENV_BIN / "workbench").exists() or not (VENV_BIN / "configurable-http-proxy").exists():
        print(
            f"run this with the project's venv (.venv/bin/python), after `make install`; "
            f"{VENV_BIN} has no workbench or configurable-http-proxy",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    metrics = ["login", "dask", "quota"] if args.only is None else [args.only]

    root = make_state_dir("wb-bench-")
    say(f"state folder {root}; {args.runs} run(s) per side for: {', '.join(metrics)}; {os.cpu_count()} CPUs")
    raw: dict = {m: {"workbench": [], "stock": []} for m in metrics}
    starts: dict = {}
    ok = False
    wb: Workbench | None = None
    stock: StockHub | None = None
    try:
        # 1. the workbench: login runs, then dask gateway runs, then stop it
        wb = Workbench(root / "workbench-state")
        say("starting `workbench up` …")
        t0 = time.perf_counter()
        wb.start()
        starts["workbench"] = time.perf_counter() - t0
        say(f"workbench ready at {wb.url} after {starts['workbench']:.2f}s")
        hub_log = lambda: wb.hub_log()[-3000:]  # noqa: E731
        if "login" in metrics or "quota" in metrics:
            on = login_runs("workbench", wb.url, args.runs, wb.proc.pid, hub_log, wb.snapshot, wb.hub_log)
            for m in ("login", "quota"):
                if m in metrics:
                    raw[m]["workbench"] = on
        if "dask" in metrics:
            s = wb.login(USER)
            if s.login_status != 302:
                raise RuntimeError(f"workbench login as {USER} answered {s.login_status}")
            token = wb.new_token(s, USER)
            raw["dask"]["workbench"] = gateway_runs(wb, token, args.runs)
        say("stopping the workbench …")
        code = wb.stop()
        leftovers = wb.leftovers()
        if code != 0 or leftovers:
            say(f"warning: workbench up exited with {code}; leftovers: {leftovers}")
        wb = None

        # 1b. the workbench without its quota service: the cost of admission checks at spawn
        if "quota" in metrics:
            wb = Workbench(root / "workbench-noquota-state", extra_args=("--no-quota",))
            say("starting `workbench up --no-quota` …")
            wb.start()
            hub_log = lambda: wb.hub_log()[-3000:]  # noqa: E731
            raw["quota"]["stock"] = login_runs(
                "workbench --no-quota", wb.url, args.runs, wb.proc.pid, hub_log, wb.snapshot
            )
            say("stopping the workbench …")
            wb.stop()
            wb = None

        # 2. the stock hub: login runs
        if "login" in metrics:
            stock = StockHub(root / "stock")
            say("starting stock jupyterhub …")
            t0 = time.perf_counter()
            stock.start()
            starts["stock"] = time.perf_counter() - t0
            say(f"stock hub ready at {stock.url} after {starts['stock']:.2f}s")
            stock_log = lambda: stock.output()[-3000:]  # noqa: E731
            raw["login"]["stock"] = login_runs(
                "stock", stock.url, args.runs, stock.proc.pid, stock_log, stock.snapshot, stock.output
            )
            say("stopping the stock hub …")
            stock.stop()
            stock = None

        # 3. LocalCluster
        if "dask" in metrics:
            say("LocalCluster runs …")
            raw["dask"]["stock"] = local_cluster_runs(args.runs)
        ok = True
    except KeyboardInterrupt:
        say("interrupted; stopping everything …")
    finally:
        if wb is not None:
            try:
                wb.stop()
            finally:
                tracker = Tracker()
                tracker.seen = dict(wb.seen)
                n = tracker.kill_leftovers()
                if n:
                    say(f"killed {n} leftover workbench process(es)")
        if stock is not None:
            stock.stop()
        if ok and not args.keep_state:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"state and logs kept in {root}")

    if not ok:
        return 130
    results: dict = {}
    for m in metrics:
        wb_s, st_s = summary(raw[m]["workbench"]), summary(raw[m]["stock"])
        results[m] = {
            "workbench": {"runs": raw[m]["workbench"], "summary": wb_s},
            "stock": {"runs": raw[m]["stock"], "summary": st_s},
            "ratio_median": ratio(wb_s, st_s),
        }
    results["hub_start_s"] = starts
    total = time.monotonic() - T_START
    results["meta"] = {
        "runs": args.runs,
        "user": USER,
        "poll_interval_s": POLL,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "as_root": os.geteuid() == 0,
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": total,
    }
    print_table(results)
    say(f"done in {total:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
