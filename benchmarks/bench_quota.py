#!/usr/bin/env python
"""Benchmark the quota ledger and service on SQLite and PostgreSQL.

Two metrics, each on both databases:

  admission   (old path) latency of Ledger.admit() with C concurrent callers (default 200), all issued at the same
              moment and run by --db-threads threads (default 8, as in the service; 0: one thread
              per caller), timed from that moment to each answer: budgets of the group (its rows of the current month are
              read and summed) and caps (its running rows) are checked and the start is recorded, in
              one transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE on the
              group's lock row). The group's caps are high enough for every call to be allowed.
              The ledger starts with --history closed rows in the current month (default 2000),
              spread over --groups groups, so the budget check reads a realistic month.
  batched     (the service's path) C concurrent Admitter.admit() coroutines on one event loop: decided in
              memory, answered when their group commit is done; 5 bursts after a warm-up one
  ingest      events recorded per second: single-event transactions from one thread, from 8
              threads, and batches of 100 events per transaction (start + stop pairs).

  --layer ledger   Ledger in this process (default)
  --layer http     through a real embedded workbench (`workbench up`: hub, proxy, the quota service as a
                   hub service) with the gateway's service token: POST /services/quota/api/admit and
                   /api/events, so HubAuth (cached), the proxy and the service's thread pool are included.
  --layer both

PostgreSQL: $WORKBENCH_TEST_POSTGRES_URL, else scripts/postgres-up.sh (Debian's packages, as root);
each run uses a fresh database, dropped at the end. SQLite: a file in a temporary folder.

Run:  .venv/bin/python benchmarks/bench_quota.py [--concurrency 200] [--layer both] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.quota_support import fresh_postgres_database, postgres_url, quota_policy_data  # noqa: E402
from workbench.policy import parse_policy  # noqa: E402
from workbench.services.quota.ledger import Ledger, default_db_url  # noqa: E402
from workbench.services.quota.models import AdmitRequest, UsageEvent  # noqa: E402

UTC = UTC


def bench_policy_data(groups: int) -> dict:
    data = quota_policy_data()
    lab = data["groups"]["physics-lab"]
    for i in range(groups):
        data["groups"][f"bench-{i}"] = {
            "kind": "research",
            "profiles": lab["profiles"],
            "budget": {"gpu_hours": 10**7, "cpu_hours": 10**8, "period": "month", "per_user": {"gpu_hours": 10**6}},
            "caps": {"running_gpus": 10**6, "running_servers": 10**6},
        }
    return data


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def fill_history(ledger: Ledger, rows: int, groups: int) -> None:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = max(60.0, (now - month_start).total_seconds() - 3600)
    evs = []
    for i in range(rows):
        t0 = month_start + timedelta(seconds=span * i / rows)
        item = f"dask-worker:hist/{i}"
        kw = dict(cpu=1.0, memory=10**9, gpu_type="h100", gpu_count=1)
        evs.append(
            UsageEvent(
                id=f"h{i}s",
                type="start",
                item=item,
                kind="dask-worker",
                user=f"u{i % 50}",
                group=f"bench-{i % groups}",
                time=t0,
                **kw,
            )
        )
        evs.append(UsageEvent(id=f"h{i}e", type="stop", item=item, time=t0 + timedelta(minutes=30)))
    for k in range(0, len(evs), 1000):
        ledger.record_many(evs[k : k + 1000])


def concurrent_calls(n: int, call, workers: int | None = None) -> tuple[list[float], float, list]:
    """``n`` calls issued at the same moment; each one's latency counts from that moment to its answer.

    ``workers``: how many run at once (None: all ``n``, one thread each); the others queue, as
    requests queue for the quota service's database threads.
    """
    if workers is None or workers >= n:
        barrier = threading.Barrier(n)
        lat = [0.0] * n
        out = [None] * n

        def one(i):
            barrier.wait()
            t0 = time.perf_counter()
            out[i] = call(i)
            lat[i] = (time.perf_counter() - t0) * 1000

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))
        return lat, time.perf_counter() - t0, out

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: None, range(workers)))  # threads started before the clock
        t0 = time.perf_counter()

        def timed(i):
            r = call(i)
            return r, (time.perf_counter() - t0) * 1000

        futures = [pool.submit(timed, i) for i in range(n)]
        done = [f.result() for f in futures]
    return [ms for _, ms in done], time.perf_counter() - t0, [r for r, _ in done]


def event_pairs(prefix: str, n: int, groups: int) -> list[UsageEvent]:
    evs = []
    for i in range(n // 2):
        item = f"dask-worker:{prefix}/{i}"
        evs.append(
            UsageEvent(
                id=f"{prefix}-{i}-s",
                type="start",
                item=item,
                kind="dask-worker",
                user=f"u{i % 50}",
                group=f"bench-{i % groups}",
                cpu=1.0,
                memory=10**9,
                gpu_type="h100",
                gpu_count=1,
            )
        )
        evs.append(UsageEvent(id=f"{prefix}-{i}-e", type="stop", item=item))
    return evs


def ingest_rates(send_one, send_batch, events: int, groups: int) -> dict:
    out = {}
    evs = event_pairs(f"seq-{uuid.uuid4().hex[:6]}", events, groups)
    t0 = time.perf_counter()
    for e in evs:
        send_one(e)
    out["single_1_thread_per_s"] = round(len(evs) / (time.perf_counter() - t0), 1)

    evs = event_pairs(f"par-{uuid.uuid4().hex[:6]}", events, groups)
    # 8 threads; each item's start and stop stay in order on one thread
    pairs = [evs[i : i + 2] for i in range(0, len(evs), 2)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: [send_one(e) for e in p], pairs))
    out["single_8_threads_per_s"] = round(len(evs) / (time.perf_counter() - t0), 1)

    evs = event_pairs(f"bat-{uuid.uuid4().hex[:6]}", events * 5, groups)
    t0 = time.perf_counter()
    for k in range(0, len(evs), 100):
        send_batch(evs[k : k + 100])
    out["batch_100_per_s"] = round(len(evs) / (time.perf_counter() - t0), 1)
    return out


# ---------------------------------------------------------------------------


def bench_ledger(url: str, policy, args) -> dict:
    ledger = Ledger(url, policy, pool_size=max(16, args.concurrency // 4), durability=args.durability)
    try:
        t0 = time.perf_counter()
        fill_history(ledger, args.history, args.groups)
        fill_s = time.perf_counter() - t0
        results = {"history_rows": args.history, "history_fill_s": round(fill_s, 2)}
        run = uuid.uuid4().hex[:6]

        def call(i):
            return ledger.admit(
                f"u{i}",
                f"bench-{i % args.groups}",
                AdmitRequest(
                    item=f"dask-worker:adm-{run}/{i}",
                    kind="dask-worker",
                    cpu=1,
                    memory=10**9,
                    gpu_type="h100",
                    gpu_count=1,
                ),
            )

        # warm the pool and the caches once
        concurrent_calls(
            min(20, args.concurrency),
            lambda i: ledger.admit(
                "warm", "bench-0", AdmitRequest(item=f"dask-worker:warm-{run}/{i}", kind="dask-worker", cpu=1)
            ),
        )
        if args.batched_only:
            results["admission_batched"] = batched_admissions(ledger, args, run)
            return results
        lat, wall, out = concurrent_calls(args.concurrency, call, args.db_threads or None)
        assert all(d.allowed for d in out), [d.message for d in out if not d.allowed][:3]
        results["admission"] = {
            **summary(lat),
            "concurrency": args.concurrency,
            "wall_s": round(wall, 3),
            "throughput_per_s": round(args.concurrency / wall, 1),
            "db_threads": args.db_threads or args.concurrency,
        }
        results["admission_batched"] = batched_admissions(ledger, args, run)
        seq = []
        for i in range(args.concurrency):  # the same work, one at a time: no queueing
            t0 = time.perf_counter()
            ledger.admit(
                f"s{i}",
                f"bench-{i % args.groups}",
                AdmitRequest(
                    item=f"dask-worker:seq-{run}/{i}", kind="dask-worker", cpu=1, gpu_type="h100", gpu_count=1
                ),
            )
            seq.append((time.perf_counter() - t0) * 1000)
        results["admission_sequential"] = summary(seq)
        results["ingest"] = ingest_rates(ledger.record, ledger.record_many, args.events, args.groups)
        return results
    finally:
        ledger.close()


def batched_admissions(ledger: Ledger, args, run: str, rounds: int = 5) -> dict:
    """The service's path (admission.Admitter): ``concurrency`` admit() coroutines issued at once on one event
    loop, decided in memory, answered when their batch is committed. ``rounds`` bursts (after a warm-up one);
    p50/p99 over all of them."""
    import asyncio

    from workbench.services.quota.admission import Admitter

    admitter = Admitter(ledger)
    steps: list[dict] = []

    async def burst(tag: str) -> list[float]:
        lat = [0.0] * args.concurrency

        async def one(i):
            d = await admitter.admit(
                f"u{i}",
                f"bench-{i % args.groups}",
                AdmitRequest(
                    item=f"dask-worker:{tag}-{run}/{i}",
                    kind="dask-worker",
                    cpu=1,
                    memory=10**9,
                    gpu_type="h100",
                    gpu_count=1,
                ),
            )
            lat[i] = (time.perf_counter() - t0) * 1000
            assert d.allowed, d.message

        t0 = time.perf_counter()
        admitter.timeline.clear()
        await asyncio.gather(*(one(i) for i in range(args.concurrency)))
        done = time.perf_counter()
        # timeline of the burst: the decisions on the event loop (until the last one), the first commit's start
        # (commits overlap the decisions: the committer starts on the first admission), the commits, the
        # last commit's end to the last answer
        batches = list(admitter.timeline)
        if batches:
            steps.append(
                {
                    "decide_ms": (admitter.decided - t0) * 1000,
                    "first_commit_ms": (batches[0][0] - t0) * 1000,
                    "commit_ms": sum(e - b for b, e, _ in batches) * 1000,
                    "batches": len(batches),
                    "last_batch": batches[-1][2],
                    "last_commit_end_ms": (batches[-1][1] - t0) * 1000,
                    "answer_ms": (done - batches[-1][1]) * 1000,
                    "total_ms": (done - t0) * 1000,
                }
            )
        return lat

    async def main() -> tuple[list[float], list[float], int]:
        await burst("bwarm")
        steps.clear()
        b0 = admitter.batches
        walls, lat = [], []
        for r in range(rounds):
            w0 = time.perf_counter()
            lat += await burst(f"b{r}")
            walls.append(time.perf_counter() - w0)
        return lat, walls, admitter.batches - b0

    try:
        lat, walls, batches = asyncio.run(main())
    finally:
        admitter.close()
    return {
        **summary(lat),
        "concurrency": args.concurrency,
        "rounds": rounds,
        "wall_s": round(statistics.median(walls), 4),
        "throughput_per_s": round(args.concurrency / statistics.median(walls), 1),
        "transactions_per_burst": round(batches / rounds, 1),
        "timeline_median_ms": {
            k: round(statistics.median(st[k] for st in steps), 2)
            for k in (
                "decide_ms",
                "first_commit_ms",
                "commit_ms",
                "batches",
                "last_batch",
                "last_commit_end_ms",
                "answer_ms",
                "total_ms",
            )
        }
        if steps
        else {},
    }


def bench_http(db_url: str | None, policy_data: dict, args) -> dict:
    import requests
    from requests.adapters import HTTPAdapter

    from tests.integration.harness import Workbench

    parent = Path(tempfile.mkdtemp(prefix="wb-bench-quota-", dir="/tmp"))
    parent.chmod(0o711)
    config = parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy_data))
    env = {"WORKBENCH_QUOTA_DB_URL": db_url} if db_url else {}
    wb = Workbench(parent / "state", config=config, env=env).start()
    try:
        secrets = json.loads((wb.state_dir / "secrets.json").read_text())
        headers = {"Authorization": f"token {secrets['gateway_api_token']}"}
        api = f"{wb.url}/services/quota/api"
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=args.concurrency + 8))
        session.headers.update(headers)
        while session.get(f"{api}/health", timeout=5).status_code != 200:
            time.sleep(0.2)
        ledger = Ledger(db_url or default_db_url(wb.state_dir), parse_policy(policy_data))
        t0 = time.perf_counter()
        fill_history(ledger, args.history, args.groups)
        ledger.close()
        results = {"history_rows": args.history, "history_fill_s": round(time.perf_counter() - t0, 2)}
        run = uuid.uuid4().hex[:6]

        def body(i, prefix):
            return {
                "user": f"u{i}",
                "group": f"bench-{i % args.groups}",
                "item": f"dask-worker:{prefix}-{run}/{i}",
                "kind": "dask-worker",
                "cpu": 1,
                "memory": 10**9,
                "gpu_type": "h100",
                "gpu_count": 1,
            }

        concurrent_calls(20, lambda i: session.post(f"{api}/admit", json=body(i, "warm"), timeout=120))
        lat, wall, out = concurrent_calls(
            args.concurrency, lambda i: session.post(f"{api}/admit", json=body(i, "adm"), timeout=120)
        )
        codes = {r.status_code for r in out}
        assert codes == {200}, codes
        results["admission"] = {
            **summary(lat),
            "concurrency": args.concurrency,
            "wall_s": round(wall, 3),
            "throughput_per_s": round(args.concurrency / wall, 1),
        }
        seq = []
        for i in range(args.concurrency):  # the same work, one at a time: no queueing
            t0 = time.perf_counter()
            assert session.post(f"{api}/admit", json=body(i, "seq"), timeout=120).status_code == 200
            seq.append((time.perf_counter() - t0) * 1000)
        results["admission_sequential"] = summary(seq)

        def send(evs):
            r = session.post(
                f"{api}/events",
                timeout=120,
                json={"events": [json.loads(e.model_dump_json(exclude_none=True)) for e in evs]},
            )
            assert r.status_code == 200, r.text

        results["ingest"] = ingest_rates(lambda e: send([e]), send, args.events, args.groups)
    finally:
        wb.stop()
    shutil.rmtree(parent, ignore_errors=True)
    return results


def plot(report: dict, path: str) -> None:
    """A PNG: p50 and p99 of 200 concurrent admissions, old path vs new, per database (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, r in report["results"].items() if "admission_batched" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    width, x = 0.2, range(len(keys))
    bars = [
        ("old p50", "admission", "p50_ms", "#d9a0a0"),
        ("old p99", "admission", "p99_ms", "#b03030"),
        ("new p50", "admission_batched", "p50_ms", "#a0c0e0"),
        ("new p99", "admission_batched", "p99_ms", "#2060a0"),
    ]
    for j, (label, part, stat, color) in enumerate(bars):
        values = [report["results"][k][part][stat] for k in keys]
        pos = [i + (j - 1.5) * width for i in x]
        ax.bar(pos, values, width, label=label, color=color)
        for px, v in zip(pos, values, strict=True):
            ax.annotate(f"{v:g}", (px, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(5, color="gray", linestyle="--", linewidth=1, label="target p99 5 ms")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [k.split("/")[-1] for k in keys])
    ax.set_ylabel("ms from the burst to each answer (log)")
    ax.set_title(f"{report['args']['concurrency']} concurrent admissions: one transaction each vs group commit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--history", type=int, default=2000, help="closed rows in the current month before the run")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument(
        "--db-threads",
        type=int,
        default=8,
        help="ledger layer: threads running the admissions, like the service's --threads "
        "(0: one thread per concurrent caller) (default: %(default)s)",
    )
    ap.add_argument("--events", type=int, default=1000, help="events per ingest measurement (batches: 5x)")
    ap.add_argument("--layer", choices=["ledger", "http", "both"], default="ledger")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument(
        "--durability",
        choices=["process", "machine"],
        default="process",
        help="the ledger's durability (see workbench.services.quota.engine): 'process' = SQLite synchronous=NORMAL, "
        "PostgreSQL synchronous_commit=off (the service's default); 'machine' = an fsync per commit (default: %(default)s)",
    )
    ap.add_argument(
        "--batched-only",
        action="store_true",
        help="ledger layer: only the service's path (Admitter), no old path/ingest",
    )
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--plot", help="write a PNG of the admission latencies (old vs new path) to this file")
    args = ap.parse_args(argv)

    policy_data = bench_policy_data(args.groups)
    policy = parse_policy(policy_data)
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    layers = ["ledger", "http"] if args.layer == "both" else [args.layer]
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": vars(args),
        "results": {},
    }
    pg_base = postgres_url() if "postgresql" in dbs else None
    for layer in layers:
        for db in dbs:
            tmp = Path(tempfile.mkdtemp(prefix="wb-bench-ledger-"))
            drop = None
            if db == "sqlite":
                url = default_db_url(tmp) if layer == "ledger" else None
            else:
                if pg_base is None:
                    print("skipping PostgreSQL: run as root or set WORKBENCH_TEST_POSTGRES_URL", file=sys.stderr)
                    continue
                url, drop = fresh_postgres_database(pg_base)
            try:
                print(f"[{layer} / {db}] …", file=sys.stderr, flush=True)
                res = bench_ledger(url, policy, args) if layer == "ledger" else bench_http(url, policy_data, args)
            finally:
                if drop:
                    drop()
                shutil.rmtree(tmp, ignore_errors=True)
            report["results"][f"{layer}/{db}"] = res
            if "admission" not in res:  # --batched-only
                b = res["admission_batched"]
                print(
                    f"[{layer} / {db}] batched x{b['concurrency']}: p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms",
                    flush=True,
                )
                continue
            a, i = res["admission"], res["ingest"]
            print(
                f"[{layer} / {db}] admission x{a['concurrency']}: p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms, "
                f"max {a['max_ms']} ms ({a['throughput_per_s']}/s); ingest: {i['single_1_thread_per_s']}/s single, "
                f"{i['single_8_threads_per_s']}/s single x8 threads, {i['batch_100_per_s']}/s in batches of 100",
                flush=True,
            )
    print()
    print(
        "200 concurrent admissions: one transaction each (Ledger.admit) vs decided in memory + group commit (Admitter)"
    )
    print(f"{'db':<20} {'old p50 ms':>10} {'old p99 ms':>10} {'new p50 ms':>10} {'new p99 ms':>10} {'tx/burst':>9}")
    for key, res in report["results"].items():
        if "admission_batched" in res:
            a, b = res.get("admission", {}), res["admission_batched"]
            print(
                f"{key:<20} {a.get('p50_ms', '-'):>10} {a.get('p99_ms', '-'):>10} {b['p50_ms']:>10} {b['p99_ms']:>10} "
                f"{b['transactions_per_burst']:>9}"
            )
            tl = b.get("timeline_median_ms") or {}
            if tl:
                print(
                    f"{'':<20} timeline (median burst, ms from the burst's start): last decision at {tl['decide_ms']}, "
                    f"first commit from {tl['first_commit_ms']}, commits {tl['commit_ms']} in {tl['batches']} "
                    f"batch(es) (last: {tl['last_batch']} rows, done at {tl['last_commit_end_ms']}), "
                    f"answers +{tl['answer_ms']}, total {tl['total_ms']}"
                )
    if args.plot:
        plot(report, args.plot)
    print()
    print(
        f"{'layer/db':<20} {'adm p50 ms':>10} {'adm p99 ms':>10} {'adm/s':>8} {'alone p50':>10} {'alone p99':>10} "
        f"{'ingest 1x/s':>12} {'8x/s':>8} {'batch/s':>9}"
    )
    for key, res in report["results"].items():
        if "admission" not in res:
            continue
        a, i, q = res["admission"], res["ingest"], res["admission_sequential"]
        print(
            f"{key:<20} {a['p50_ms']:>10} {a['p99_ms']:>10} {a['throughput_per_s']:>8} {q['p50_ms']:>10} "
            f"{q['p99_ms']:>10} {i['single_1_thread_per_s']:>12} {i['single_8_threads_per_s']:>8} "
            f"{i['batch_100_per_s']:>9}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
