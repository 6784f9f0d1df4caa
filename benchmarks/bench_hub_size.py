#!/usr/bin/env python
"""Hub at size (issue 12, target 4): 10,000 users and 500 running servers in the hub's database.

The same database (written with JupyterHub's own ORM before the hub starts, copied for each side) under two hubs:

  workbench  the embedded workbench's hub: `hub_config/jupyterhub_config.py` = workbench.embedded.hub.configure_hub
             (our DemoAuthenticator with the roster merge at login, WorkbenchLocalSpawner with its state and
             mixins, the roles of the policy, the managed services: Dask Gateway, quota, sessions, rosters, jobs),
             with a policy that lists the 10,000 users as demo accounts.
  stock      the same JupyterHub with none of that: DummyAuthenticator (password, allow_all) and
             SimpleLocalProcessSpawner (the stock LocalProcessSpawner), no services.

Both: sqlite, configurable-http-proxy, `cleanup_servers = False` (the hub leaves the servers alone when it stops),
and one extra service `bench` with an API token allowed to list users.

The database: users `hs00000..hs09999`, groups as in hub_config/demo.yaml (9,000 in course-ml101, whose roster
property lists 2,000 of them, 1,000 in physics-lab); the first 500 users have a running default server. The
running servers are one stand-in HTTP server (a tiny tornado process answering 200 on every path, also
`/user/<u>/api` that the hub checks) at one port, and every server's state is `{"pid": <the stand-in's pid>}`
(+ `"profile": "cpu-small"`): the stock `LocalProcessSpawner.poll` (used by both spawners) finds the pid alive,
and the hub's start-up check (`check_spawner`: poll, then an HTTP check of each server) keeps all 500 running.

Measured per side (one hub start each; the machine's load average printed with them):
  start-up     from launching `jupyterhub` until /hub/health answers 200 on the hub's own port, until it answers
               through the proxy (JupyterHub adds its own route only after every managed service is up, one after
               the other), and until the hub has checked all 500 servers ("<user> still running" in its log, 500
               times); servers lost at start-up are counted
  users API    GET /hub/api/users?limit=200&offset=k (all 50 pages, 3 passes, with the `bench` token): p50/p99
  login        POST of the login form for 60 users (GET /hub/login for _xsrf not timed), p50/p99
Ratios workbench / stock are printed; --plot draws benchmarks/hub_size.png, --json keeps every sample.

Run:  nice -n 5 .venv/bin/python benchmarks/bench_hub_size.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import requests
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_embedded import Tracker, make_state_dir, say  # noqa: E402

from tests.integration.harness import DEMO, PASSWORD, VENV_BIN, free_port  # noqa: E402
from workbench.names import ROSTER_PROPERTY  # noqa: E402
from workbench.runtime import Runtime  # noqa: E402

STAND_IN = """
import sys
from tornado import ioloop, web
class H(web.RequestHandler):
    def get(self, *a):
        self.set_header("X-JupyterHub-Version", sys.argv[2])
        self.write({"version": "stand-in"})
web.Application([(r"/.*", H)]).listen(int(sys.argv[1]), address="127.0.0.1")
ioloop.IOLoop.current().start()
"""

BENCH_SERVICE = """
c.JupyterHub.cleanup_servers = False
c.JupyterHub.services = list(c.JupyterHub.services) + [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = list(c.JupyterHub.load_roles) + [
    {{"name": "bench", "scopes": ["list:users", "read:users", "read:servers"], "services": ["bench"]}}
]
"""

WORKBENCH_CONFIG = (
    """
from workbench.embedded.hub import configure_hub
configure_hub(c)
"""
    + BENCH_SERVICE
)

STOCK_CONFIG = (
    """
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{state}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "jupyterhub.auth.DummyAuthenticator"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.Spawner.http_timeout = 90
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.services = []
c.JupyterHub.load_roles = []
"""
    + BENCH_SERVICE
)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def user_name(i: int) -> str:
    return f"hs{i:05d}"


def write_database(path: Path, users: int, running: int, port: int, pid: int) -> None:
    """The hub database, with JupyterHub's ORM (the schema of the installed JupyterHub), as a hub that has run
    leaves it: the default roles exist and every user holds the role ``user`` (a database without roles would make
    the hub assign them one user at a time at start-up, its "hub upgrade" path, and measure that instead)."""
    from jupyterhub import orm
    from jupyterhub.roles import get_default_roles

    db = orm.new_session_factory(f"sqlite:///{path}")()
    now = datetime.now(UTC).replace(tzinfo=None)
    names = [user_name(i) for i in range(users)]
    course = orm.Group(name="course-ml101", properties={ROSTER_PROPERTY: names[: users // 5]})
    lab = orm.Group(name="physics-lab")
    db.add_all([course, lab])
    objs = []
    for i, name in enumerate(names):
        u = orm.User(name=name, created=now, last_activity=now)
        u.groups = [course if i % 10 else lab]
        objs.append(u)
    db.add_all(objs)
    for role in get_default_roles():
        r = orm.Role(name=role["name"], description=role["description"], scopes=role["scopes"])
        if role["name"] == "user":
            r.users = objs
        db.add(r)
    db.flush()
    for u in objs[:running]:
        server = orm.Server(ip="127.0.0.1", port=port, base_url=f"/user/{u.name}/")
        db.add(server)
        db.add(
            orm.Spawner(
                user=u,
                name="",
                server=server,
                state={"pid": pid, "profile": "cpu-small"},
                started=now,
                last_activity=now,
            )
        )
    db.commit()
    db.close()


def size_policy(users: int, path: Path) -> Path:
    policy = yaml.safe_load(DEMO.read_text())
    policy["auth"]["demo_users"].update(
        {user_name(i): {"groups": ["course-ml101" if i % 10 else "physics-lab"]} for i in range(users)}
    )
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


class Hub:
    """One `jupyterhub -f CONFIG` on a copy of the database, timed from launch."""

    def __init__(self, side: str, state: Path, config: Path, url: str, hub_url: str, env: dict):
        self.side, self.state, self.config, self.url, self.env = side, state, config, url, env
        self.hub_url = hub_url  # the hub's own port (not through the proxy)
        self.log_path = state / "hub.log"
        self.proc: subprocess.Popen | None = None

    def start(self, running: int, timeout: float = 900) -> dict:
        self._log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        # the workbench's hub is workbench.hubapp.WorkbenchHub, launched as `workbench up` does; the others are
        # JupyterHub itself (`workbench-sequential`: the workbench's configuration under upstream's class)
        from workbench.hubapp import HUB_LAUNCHER

        argv = [sys.executable, str(HUB_LAUNCHER)] if self.side == "workbench" else [str(VENV_BIN / "jupyterhub")]
        self.proc = subprocess.Popen(
            [*argv, "-f", str(self.config)],
            cwd=self.state,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tracker = Tracker(self.proc.pid)
        out: dict = {}
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            self.tracker.snapshot()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side} hub exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if "hub_api_s" not in out:
                try:
                    if requests.get(f"{self.hub_url}/hub/health", timeout=5).status_code == 200:
                        out["hub_api_s"] = time.perf_counter() - t0
                except requests.RequestException:
                    pass
            if "health_s" not in out:
                try:
                    if requests.get(f"{self.url}/hub/health", timeout=5).status_code == 200:
                        out["health_s"] = time.perf_counter() - t0
                except requests.RequestException:
                    pass
            if "checked_s" not in out:
                log = self.log()
                checked = len(re.findall(r" still running$", log, re.M))
                lost = len(
                    re.findall(r"appears to have stopped while the Hub was down|does not appear to be running", log)
                )
                if checked + lost >= running:
                    out["checked_s"] = time.perf_counter() - t0
                    out["still_running"], out["lost"] = checked, lost
            if "health_s" in out and "checked_s" in out:
                return out
            time.sleep(0.2)
        raise TimeoutError(f"{self.side} hub: not started and checked after {timeout:.0f} s\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.tracker.snapshot()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.tracker.kill_leftovers()
            self._log.close()


def users_api(url: str, token: str, users: int, passes: int) -> tuple[list[float], int]:
    lat, total = [], 0
    for _ in range(passes):
        total = 0
        for offset in range(0, users, 200):
            t = time.perf_counter()
            r = requests.get(
                f"{url}/hub/api/users",
                params={"limit": 200, "offset": offset},
                headers={"Authorization": f"token {token}"},
                timeout=120,
            )
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
            total += len(r.json())
    return lat, total


def running_servers(url: str, token: str) -> int:
    """Users with a running default server, from the hub's API (pages of 200, the hub's largest)."""
    count, offset = 0, 0
    while True:
        r = requests.get(
            f"{url}/hub/api/users",
            params={"state": "active", "limit": 200, "offset": offset},
            headers={"Authorization": f"token {token}"},
            timeout=120,
        )
        r.raise_for_status()
        page = r.json()
        count += sum(1 for u in page if (u.get("servers") or {}).get(""))
        if len(page) < 200:
            return count
        offset += 200


def logins(url: str, names: list[str]) -> list[float]:
    lat = []
    for name in names:
        s = requests.Session()
        r = s.get(f"{url}/hub/login", timeout=60)
        r.raise_for_status()
        xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text).group(1)
        t = time.perf_counter()
        r = s.post(
            f"{url}/hub/login",
            data={"username": name, "password": PASSWORD, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=60,
        )
        lat.append(time.perf_counter() - t)
        if r.status_code != 302:
            raise RuntimeError(f"login of {name} answered {r.status_code}")
    return lat


def run_side(side: str, base_db: Path, args, stand_in_port: int) -> dict:
    state = make_state_dir(f"wb-bench-size-{side}-")
    db = state / "jupyterhub.sqlite"
    shutil.copy(base_db, db)
    token = secrets.token_hex(16)
    port, hub_port = free_port(), free_port()
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if side.startswith("workbench"):
        policy = size_policy(args.users, state / "platform.yaml")
        runtime = Runtime(
            config=str(policy),
            state_dir=str(state),
            hub_config_dir=str(REPO / "hub_config"),
            venv_bin=str(VENV_BIN),
            proxy_command=str(VENV_BIN / "configurable-http-proxy"),
            port=port,
            hub_port=hub_port,
            proxy_api_port=free_port(),
            gateway_port=free_port(),
            gateway_http_port=free_port(),
            gateway_tcp_port=free_port(),
            gateway_guard_port=free_port(),
            quota_port=free_port(),
            sessions_port=free_port(),
            rosters_port=free_port(),
            system_users=os.geteuid() == 0,
        )
        (state / "logs").mkdir(exist_ok=True)
        env.update(WORKBENCH_RUNTIME=str(runtime.write()), WORKBENCH_DEMO_PASSWORD=PASSWORD)
        config = state / "jupyterhub_config.py"
        config.write_text(WORKBENCH_CONFIG.format(token=token))
    else:
        config = state / "jupyterhub_config.py"
        config.write_text(
            STOCK_CONFIG.format(
                port=port,
                hub_port=hub_port,
                proxy_api_port=free_port(),
                state=state,
                password=PASSWORD,
                proxy=str(VENV_BIN / "configurable-http-proxy"),
                token=token,
            )
        )
    url = f"http://127.0.0.1:{port}"
    hub = Hub(side, state, config, url, f"http://127.0.0.1:{hub_port}", env)
    out: dict = {"load_before": os.getloadavg()}
    say(f"{side}: starting the hub on {args.users} users / {args.running} running servers ({load()})")
    try:
        out.update(hub.start(args.running))
        say(
            f"{side}: the hub's own /hub/health 200 after {out['hub_api_s']:.1f} s, through the proxy after "
            f"{out['health_s']:.1f} s, all {args.running} servers checked after "
            f"{out['checked_s']:.1f} s ({out['still_running']} still running, {out['lost']} lost)"
        )
        out["running_after_start"] = running_servers(url, token)
        lat, listed = users_api(url, token, args.users, args.passes)
        out["users_api_s"], out["users_listed"] = lat, listed
        say(
            f"{side}: GET /hub/api/users?limit=200: p50 {pct(lat, 0.5) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms "
            f"({len(lat)} pages, {listed} users per pass)"
        )
        half = args.logins // 2  # half of them have a running server, half not
        names = [user_name(i) for i in range(half)] + [user_name(args.running + i) for i in range(args.logins - half)]
        out["login_s"] = logins(url, names)
        say(
            f"{side}: login POST p50 {pct(out['login_s'], 0.5) * 1000:.0f} ms, p99 {pct(out['login_s'], 0.99) * 1000:.0f} ms"
        )
        out["running_at_end"] = running_servers(url, token)
        out["load_after"] = os.getloadavg()
    finally:
        hub.stop()
    if not args.keep_state:
        shutil.rmtree(state, ignore_errors=True)
    return out


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("start-up: hub\n/hub/health (s)", lambda r: r["hub_api_s"]),
        ("start-up: proxy\n/hub/health (s)", lambda r: r["health_s"]),
        ("start-up:\n500 checked (s)", lambda r: r["checked_s"]),
        ("users API\np50 (×10 ms)", lambda r: statistics.median(r["users_api_s"]) * 100),
        ("users API\np99 (×10 ms)", lambda r: pct(r["users_api_s"], 0.99) * 100),
        ("login\np50 (×10 ms)", lambda r: statistics.median(r["login_s"]) * 100),
        ("login\np99 (×10 ms)", lambda r: pct(r["login_s"], 0.99) * 100),
    ]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for k, (side, res) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, [f(res) for _, f in metrics], width, label=side)
    ax.set_xticks(range(len(metrics)), [m for m, _ in metrics])
    ax.set_title("Hub with 10,000 users and 500 running servers: workbench hooks vs stock JupyterHub")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--running", type=int, default=500)
    ap.add_argument("--passes", type=int, default=3, help="passes over all pages of GET /hub/api/users")
    ap.add_argument("--logins", type=int, default=60)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--keep-state", action="store_true")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="also run the workbench's configuration under upstream JupyterHub's class, which starts the managed "
        "services one after the other (the start-up before workbench.hubapp)",
    )
    args = ap.parse_args(argv)

    import jupyterhub

    say(
        f"hub at size: {args.users} users, {args.running} running servers, JupyterHub {jupyterhub.__version__}, {load()}"
    )
    work = make_state_dir("wb-bench-size-")
    stand_port = free_port()
    stand_in = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(stand_port), jupyterhub.__version__], start_new_session=True
    )
    results: dict = {}
    try:
        t = time.perf_counter()
        write_database(work / "base.sqlite", args.users, args.running, stand_port, stand_in.pid)
        say(
            f"database written with JupyterHub's ORM in {time.perf_counter() - t:.1f} s; running servers: one "
            f"stand-in HTTP server (pid {stand_in.pid}, port {stand_port}) polled by LocalProcessSpawner.poll"
        )
        for side in ("workbench", "stock") + (("workbench-sequential",) if args.sequential else ()):
            results[side] = run_side(side, work / "base.sqlite", args, stand_port)
    finally:
        stand_in.terminate()
        stand_in.wait()
        shutil.rmtree(work, ignore_errors=True)

    w, s = results["workbench"], results["stock"]
    rows = [
        ("start-up: hub's own /hub/health 200", w["hub_api_s"], s["hub_api_s"], "s"),
        ("start-up: /hub/health 200 through the proxy", w["health_s"], s["health_s"], "s"),
        (f"start-up: all {args.running} servers checked", w["checked_s"], s["checked_s"], "s"),
        ("GET /hub/api/users?limit=200 p50", pct(w["users_api_s"], 0.5), pct(s["users_api_s"], 0.5), "ms"),
        ("GET /hub/api/users?limit=200 p99", pct(w["users_api_s"], 0.99), pct(s["users_api_s"], 0.99), "ms"),
        ("login POST p50", pct(w["login_s"], 0.5), pct(s["login_s"], 0.5), "ms"),
        ("login POST p99", pct(w["login_s"], 0.99), pct(s["login_s"], 0.99), "ms"),
    ]
    print()
    print(f"hub at size: {args.users} users, {args.running} running servers, {os.cpu_count()} cores")
    print("| metric | workbench | stock | ratio |")
    print("|---|---|---|---|")
    for name, a, b, unit in rows:
        f = 1000 if unit == "ms" else 1
        print(
            f"| {name} | {a * f:.0f} {unit} | {b * f:.0f} {unit} | {a / b:.2f} |"
            if unit == "ms"
            else f"| {name} | {a:.1f} s | {b:.1f} s | {a / b:.2f} |"
        )
    for side, r in results.items():
        print(
            f"{side}: servers still running after start-up {r['still_running']}, lost {r['lost']}, running at the end "
            f"{r['running_at_end']}; load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}"
        )
    if "workbench-sequential" in results:
        q = results["workbench-sequential"]
        for key, name in (("hub_api_s", "hub's own /hub/health"), ("health_s", "/hub/health through the proxy")):
            print(
                f"start-up, {name}: services one after the other (upstream's class) {q[key]:.1f} s "
                f"(ratio to stock {q[key] / s[key]:.2f}), at once (WorkbenchHub) {w[key]:.1f} s ({w[key] / s[key]:.2f})"
            )
    results["ratios"] = {name: a / b for name, a, b, _ in rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot({k: results[k] for k in ("workbench", "workbench-sequential", "stock") if k in results}, args.plot)
        say(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
