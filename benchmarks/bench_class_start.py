#!/usr/bin/env python
"""Class start (issue 12, target 2): N students log in through the login form and press start together.

Side by side in one run, with the same code for both hubs and the same single-user command
(`jupyterhub-singleuser`, default_url /lab):

  workbench  `workbench up` with hub_config/demo.yaml plus N demo students `cls01..clsNN` in course-ml101
             (profile cpu-small: a 1-core cgroup each; one Unix account per student when root; quota admission
             on; start slots on: the limit from the machine unless --slots / $WORKBENCH_START_SLOTS).
  stock      JupyterHub from a minimal generated config (benchmarks/bench_embedded.py: DummyAuthenticator,
             SimpleLocalProcessSpawner = the stock LocalProcessSpawner without Unix accounts, start_timeout 120,
             http_timeout 90), no Workbench code.

Per hub:
  alone   one student (`cls00`) logs in and starts alone, 3 times (login form POST -> /user/<u>/api/status 200,
          bench_embedded.login_to_ready); the median, and its ratio workbench / stock.
  burst   N students log in through the form at once (GET /hub/login for _xsrf, POST /hub/login, an API token
          made with the cookie and the X-XSRFToken header); when all are in, each presses start (POST of the
          spawn form /hub/spawn/<u>, as the browser's button) at t0 + i/N s, so all N within one second. Each
          then reads its progress stream (GET /hub/api/users/<u>/server/progress, as the spawn-pending page does)
          until "ready" or "failed", then polls GET /user/<u>/api/status (through the proxy, with its token) until
          200 = ready. Errors: a failed spawn, any HTTP status >= 400 on the way, no ready before the deadline.
          Meanwhile one more client polls GET /hub/api/user every 0.25 s (the hub stays responsive?).

Printed: ready count, errors, time from t0 to the last ready, p50/p99 of GET /hub/api/user during the burst, the
queue places the students saw ("N ahead of you"), the machine's load average before and after, the median of a
single start alone and its ratio. --json FILE keeps everything, --plot FILE draws the ready curve and the
/hub/api/user latencies (benchmarks/class_start.png).

Run:  nice -n 5 .venv/bin/python benchmarks/bench_class_start.py --n 40
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_embedded import StockHub, login_to_ready, make_state_dir, say, stop_server  # noqa: E402

from tests.integration.harness import DEMO, PASSWORD, Workbench, state_dir  # noqa: E402

BURST_DEADLINE = (
    3750.0  # seconds after t0 at which a student who is not ready counts as an error (the hub's start_timeout)
)
AHEAD = re.compile(r"(\d+) ahead of you")


def class_policy(n: int, path: Path) -> Path:
    """hub_config/demo.yaml with students cls00..clsNN in course-ml101 (cls00 starts alone)."""
    policy = yaml.safe_load(DEMO.read_text())
    for i in range(n + 1):
        policy["auth"]["demo_users"][f"cls{i:02d}"] = {"groups": ["course-ml101"]}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Student:
    """One browser: logs in, presses start, watches the progress stream, waits for its server."""

    def __init__(self, url: str, name: str, profile: str | None):
        self.url, self.name, self.profile = url, name, profile
        self.s = requests.Session()
        self.token = ""
        self.errors: list[str] = []
        self.messages: list[tuple[float, str]] = []
        self.login_s: float | None = None
        self.ready_at: float | None = None  # seconds after t0
        self.t0 = 0.0

    def xsrf(self) -> str:
        return self.s.cookies.get("_xsrf", path="/hub/") or ""

    def check(self, r: requests.Response, what: str, ok=(200, 201, 202, 204, 302, 303)) -> bool:
        if r.status_code not in ok:
            self.errors.append(f"{what}: HTTP {r.status_code} {r.text[:200]!r}")
            return False
        return True

    def login(self) -> None:
        t = time.perf_counter()
        try:
            r = self.s.get(f"{self.url}/hub/login", timeout=120)
            if not self.check(r, "GET /hub/login"):
                return
            m = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text)
            data = {"username": self.name, "password": PASSWORD, "_xsrf": m.group(1) if m else ""}
            r = self.s.post(f"{self.url}/hub/login", data=data, allow_redirects=False, timeout=120)
            if not self.check(r, "POST /hub/login", ok=(302,)):
                return
            self.login_s = time.perf_counter() - t
            r = self.s.post(
                f"{self.url}/hub/api/users/{self.name}/tokens",
                json={"note": "class start"},
                headers={"X-XSRFToken": self.xsrf()},
                timeout=120,
            )
            if self.check(r, "POST tokens"):
                self.token = r.json()["token"]
        except requests.RequestException as e:
            self.errors.append(f"login: {e!r}")

    def press_start(self, at: float, t0: float) -> None:
        self.t0 = t0
        time.sleep(max(0.0, at - time.perf_counter()))
        try:
            data = {"_xsrf": self.xsrf(), **({"profile": self.profile} if self.profile else {})}
            r = self.s.post(f"{self.url}/hub/spawn/{self.name}", data=data, allow_redirects=False, timeout=120)
            if not self.check(r, "POST /hub/spawn"):
                return
            self.watch_progress()
            self.wait_status()
        except requests.RequestException as e:
            self.errors.append(f"start: {e!r}")

    def watch_progress(self) -> None:
        url = f"{self.url}/hub/api/users/{self.name}/server/progress"
        deadline = self.t0 + BURST_DEADLINE
        while time.perf_counter() < deadline:
            try:
                with self.s.get(url, headers={"X-XSRFToken": self.xsrf()}, stream=True, timeout=(30, 120)) as r:
                    if not self.check(r, "GET progress"):
                        return
                    for line in r.iter_lines(decode_unicode=True):
                        if not line or not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        self.messages.append((time.perf_counter() - self.t0, event.get("message", "")))
                        if event.get("failed"):
                            self.errors.append(f"spawn failed: {event.get('message')}")
                            return
                        if event.get("ready"):
                            return
                    return  # the stream ended (the spawn is over): the status poll decides
            except requests.RequestException:
                time.sleep(1)  # the hub was too busy to answer in time: reconnect, as EventSource does

    def wait_status(self) -> None:
        if self.errors:
            return
        auth = {"Authorization": f"token {self.token}"}
        deadline = self.t0 + BURST_DEADLINE
        while time.perf_counter() < deadline:
            try:
                r = requests.get(f"{self.url}/user/{self.name}/api/status", headers=auth, timeout=30)
                if r.status_code == 200:
                    self.ready_at = time.perf_counter() - self.t0
                    return
                model = requests.get(f"{self.url}/hub/api/users/{self.name}", headers=auth, timeout=30).json()
                if not (model.get("servers") or {}).get(""):
                    self.errors.append(f"server gone before ready: {self.messages[-3:]}")
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.errors.append(f"not ready {BURST_DEADLINE:.0f} s after t0")

    @property
    def max_ahead(self) -> int | None:
        places = [int(m.group(1)) for _, msg in self.messages if (m := AHEAD.search(msg))]
        return max(places) if places else None


class Prober(threading.Thread):
    """GET /hub/api/user every 0.25 s with one token until stopped: (seconds after t0, latency, status)."""

    def __init__(self, url: str, token: str, t0: float):
        super().__init__(daemon=True)
        self.url, self.token, self.t0 = url, token, t0
        self.samples: list[tuple[float, float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                r = requests.get(
                    f"{self.url}/hub/api/user", headers={"Authorization": f"token {self.token}"}, timeout=60
                )
                code = r.status_code
            except requests.RequestException:
                code = 0
            self.samples.append((t - self.t0, time.perf_counter() - t, code))
            self.stop.wait(0.25)


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_hub(side: str, url: str, n: int, alone_runs: int, profile: str | None, log_tail) -> dict:
    out: dict = {"side": side, "load_before": os.getloadavg()}
    say(f"{side}: {alone_runs} single starts alone ({load()})")
    alone, token = [], ""
    for i in range(alone_runs):
        res = login_to_ready(url, "cls00", PASSWORD, log_tail)
        token = res.pop("token")
        say(f"{side}: alone {i + 1}/{alone_runs}: {res['total_s']:.2f} s")
        alone.append(res)
        stop_server(url, token, "cls00")
    out["alone"] = alone

    students = [Student(url, f"cls{i:02d}", profile) for i in range(1, n + 1)]
    say(f"{side}: {n} students log in through the form at once ({load()})")
    threads = [threading.Thread(target=st.login) for st in students]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logins = [st.login_s for st in students if st.login_s is not None]
    out["login_p50_s"], out["login_p99_s"] = pct(logins, 0.5), pct(logins, 0.99)
    say(f"{side}: logins p50 {out['login_p50_s'] or 0:.3f} s, p99 {out['login_p99_s'] or 0:.3f} s; all press start")

    t0 = time.perf_counter() + 0.5
    prober = Prober(url, token, t0)
    prober.start()
    threads = [
        threading.Thread(target=st.press_start, args=(t0 + i / n, t0)) for i, st in enumerate(students) if st.token
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prober.stop.set()
    prober.join()
    out["load_after"] = os.getloadavg()

    ready = sorted(st.ready_at for st in students if st.ready_at is not None)
    lat = [s[1] for s in prober.samples]
    out.update(
        n=n,
        ready=len(ready),
        ready_times_s=ready,
        errors={st.name: st.errors for st in students if st.errors or not st.token},
        last_ready_s=ready[-1] if ready else None,
        api_user_p50_s=pct(lat, 0.5),
        api_user_p99_s=pct(lat, 0.99),
        api_user_samples=prober.samples,
        api_user_5xx=sum(1 for s in prober.samples if s[2] >= 500 or s[2] == 0),
        max_ahead={st.name: st.max_ahead for st in students},
        alone_median_s=statistics.median(r["total_s"] for r in alone),
        messages={st.name: st.messages for st in students[-3:]},
    )
    queued = [a for a in out["max_ahead"].values() if a is not None]
    say(
        f"{side}: {out['ready']}/{n} ready, {len(out['errors'])} with errors, last ready at "
        f"{out['last_ready_s'] or float('nan'):.1f} s; GET /hub/api/user p50 {out['api_user_p50_s'] or 0:.3f} s "
        f"p99 {out['api_user_p99_s'] or 0:.3f} s ({len(lat)} polls, {out['api_user_5xx']} 5xx/failed); "
        f"{len(queued)} students saw a queue place (max {max(queued) if queued else '-'} ahead); {load()}"
    )
    for name, errs in list(out["errors"].items())[:5]:
        say(f"{side}:   {name}: {errs[:2]}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for side, res in results.items():
        times = res["ready_times_s"]
        a.step([0, *times], list(range(len(times) + 1)), where="post", label=f"{side}: {res['ready']}/{res['n']} ready")
        samples = res["api_user_samples"]
        b.plot([s[0] for s in samples], [s[1] * 1000 for s in samples], ".", ms=3, label=side)
    a.set(xlabel="seconds since the first press of start", ylabel="servers ready", title="Class start")
    b.set(xlabel="seconds since the first press of start", ylabel="GET /hub/api/user (ms)", yscale="log")
    b.set_title("Hub API latency during the burst")
    a.legend()
    b.legend()
    loads = ", ".join(f"{s}: {res['load_before'][0]:.1f}" for s, res in results.items())
    fig.suptitle(f"{next(iter(results.values()))['n']} students on {os.cpu_count()} cores (1-min load before: {loads})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="students in the burst (default 40)")
    ap.add_argument("--alone", type=int, default=3, help="single starts alone per hub (median; default 3)")
    ap.add_argument("--slots", type=int, default=None, help="$WORKBENCH_START_SLOTS of the workbench (default: unset)")
    ap.add_argument("--only", choices=("workbench", "stock"), help="run one side only")
    ap.add_argument("--json", type=Path, help="write every figure and sample to this file")
    ap.add_argument("--plot", type=Path, help="draw the PNG (e.g. benchmarks/class_start.png)")
    args = ap.parse_args(argv)

    say(f"class start: {args.n} students, {os.cpu_count()} cores, {load()}")
    results: dict = {}
    if args.only in (None, "workbench"):
        sd = state_dir("wb-bench-class-")
        policy = class_policy(args.n, sd.parent / "class.yaml")
        env = {"WORKBENCH_START_SLOTS": str(args.slots)} if args.slots is not None else {}
        wb = Workbench(sd, config=policy, env=env, system_users=os.geteuid() == 0)
        t = time.perf_counter()
        wb.start(timeout=300)
        say(f"workbench up ready in {time.perf_counter() - t:.1f} s")
        try:
            results["workbench"] = run_hub(
                "workbench", wb.url, args.n, args.alone, "cpu-small", lambda: wb.hub_log()[-3000:]
            )
            limits = re.findall(
                r"Start slot granted to \S+ \(\d+ starting of (\d+), \d+ waiting, peak (\d+)\)", wb.hub_log()
            )
            if limits:
                results["workbench"]["slot_limit"] = int(limits[-1][0])
                results["workbench"]["slot_peak"] = max(int(p) for _, p in limits)
            say(
                f"workbench: start slots limit {results['workbench'].get('slot_limit')}, peak {results['workbench'].get('slot_peak')}"
            )
        finally:
            say(f"workbench stopped with {wb.stop(timeout=300)}")
    if args.only in (None, "stock"):
        hub = StockHub(make_state_dir("wb-bench-class-stock-"))
        t = time.perf_counter()
        hub.start(timeout=300)
        say(f"stock hub ready in {time.perf_counter() - t:.1f} s")
        try:
            results["stock"] = run_hub("stock", hub.url, args.n, args.alone, None, lambda: hub.output()[-3000:])
        finally:
            say(f"stock hub stopped with {hub.stop(timeout=300)}")

    print()
    print(f"class start, {args.n} students, {os.cpu_count()} cores")
    print(
        "| hub | ready | errors | last ready | GET /hub/api/user p50 | p99 | saw their place | alone (median) | load before → after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for side, r in results.items():
        queued = sum(1 for a in r["max_ahead"].values() if a is not None)
        last = f"{r['last_ready_s']:.1f} s" if r["last_ready_s"] is not None else "-"
        print(
            f"| {side} | {r['ready']}/{r['n']} | {len(r['errors'])} | {last} | {r['api_user_p50_s'] * 1000:.0f} ms | "
            f"{r['api_user_p99_s'] * 1000:.0f} ms | {queued} | {r['alone_median_s']:.2f} s | "
            f"{r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |"
        )
    if "workbench" in results and "stock" in results:
        ratio = results["workbench"]["alone_median_s"] / results["stock"]["alone_median_s"]
        results["alone_ratio"] = ratio
        print(f"single start alone: workbench / stock = {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot and results:
        plot({k: v for k, v in results.items() if isinstance(v, dict)}, args.plot)
        say(f"plot: {args.plot}")
    return 0 if all(r["ready"] == r["n"] for k, r in results.items() if k == "workbench") else 1


if __name__ == "__main__":
    sys.exit(main())
