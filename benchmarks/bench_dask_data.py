#!/usr/bin/env python
"""Benchmark the data path of a Dask Gateway cluster: client.gather through the gateway vs direct TLS.

Issue 12, target 3: "client.gather of 1 GB through the gateway >= 0.9x a direct TLS connection".

Set-up: `workbench up` with hub_config/demo.yaml (as benchmarks/bench_embedded.py), log in as
`researcher`, make a hub token, and create one gateway cluster through the hub's proxy with 1 worker
of the largest worker_memory the policy allows (printed; the demo policy's physics-lab allows 2 GiB,
so the 3 GB the issue suggests does not fit). Spilling to disk is switched off on the worker (through
the cluster's `environment` option), so every gather reads from memory.

Two clients on the same scheduler, both holding the same cluster certificate and key
(`cluster.security`):
  gateway  cluster.get_client(): TLS through dask-gateway-proxy's SNI route (the normal path)
  direct   distributed.Client(<the scheduler's own tls:// address>, security=cluster.security):
           TLS straight to the scheduler's listener, no proxy hop
Both gather with direct=False (through the scheduler, as a gateway client always does), so the only
difference is the proxy hop.

Per run: the worker makes --size-mb of float64 ones with client.submit(np.ones, n, pure=False), in
chunks of --chunk-mb (each its own array, gathered by its own client.gather call, one after the
other); the timed part is gathering all the chunks, (a) through the gateway and (b) direct, in
alternating order (odd runs a then b, even runs b then a), after one untimed 1 MiB gather per side
and --warmup-runs (default 1) full-size runs of both sides that are not counted (first-touch memory costs).
Every gathered chunk is checked (shape, dtype, sum) and dropped before the next. The chunks are
released after each run.

Why chunks: a gather through the scheduler holds the whole reply in the scheduler's memory, and
the gateway caps a scheduler at 1 GiB (gateway/options.SCHEDULER_MEMORY, enforced by a cgroup or
RLIMIT_DATA), so a single 1 GiB array cannot pass through it. --chunk-mb equal to --size-mb
measures one array in one gather where it fits.

Prints per run and at the end: median, min-max (s), MB/s (1 MB = 10^6 bytes) and the ratio
gateway / direct of the median throughputs. --json FILE writes everything, --plot PNG a bar chart.
Everything started is stopped at the end, also on Ctrl-C, SIGTERM or an error.

Run with the project's venv (as root, like the integration tests):
  .venv/bin/python benchmarks/bench_dask_data.py [--runs 5] [--size-mb 1024] [--chunk-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embedded import (  # noqa: E402
    READY_TIMEOUT,
    T_START,
    USER,
    Tracker,
    _forget_loop,
    make_state_dir,
    say,
    versions,
    wait_dask_gone,
)

from tests.integration.harness import VENV_BIN, Workbench  # noqa: E402

MIB = 2**20
SIDES = ("gateway", "direct")
# keep the data in memory on the worker: spilling would time the disk, not the network
NO_SPILL = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
}


def chunk_sizes(size_mb: int, chunk_mb: int) -> list[int]:
    """Element counts (float64) of the chunks making up size_mb MiB, each at most chunk_mb MiB."""
    total = size_mb * MIB // 8
    per = chunk_mb * MIB // 8
    out = [per] * (total // per)
    if total % per:
        out.append(total % per)
    return out


def scheduler_address(client) -> str:
    """The scheduler's own TLS address, as it reports it (a wildcard host is reached on loopback)."""
    addr = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address)
    if not addr.startswith("tls://"):
        raise RuntimeError(f"the scheduler listens on {addr}, not on TLS: nothing to compare with")
    host, _, port = addr[len("tls://") :].rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        addr = f"tls://127.0.0.1:{port}"
    return addr


def wait_on(client, futures) -> None:
    """distributed.wait on ``client``'s futures (wait() itself asks for a default client; neither is one)."""
    from distributed import wait

    with client.as_current():
        wait(futures, timeout=READY_TIMEOUT)


def timed_gather(client, futures: list, sizes: list[int]) -> float:
    """Gather every future (one client.gather each, through the scheduler) and check it; seconds taken."""
    import numpy as np

    wait_on(client, futures)  # this client knows every key is in memory: only the transfers are timed
    took = 0.0
    for fut, n in zip(futures, sizes, strict=True):
        t0 = time.perf_counter()
        arr = client.gather(fut, direct=False)
        took += time.perf_counter() - t0
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.shape == (n,)):
            raise RuntimeError(f"gathered {type(arr).__name__} {getattr(arr, 'shape', '')}, not float64 ({n},)")
        total = float(arr.sum())
        if total != float(n):
            raise RuntimeError(f"gathered array sums to {total}, not {n}: the data is wrong")
        del arr
    return took


ROLES = ("proxy", "scheduler", "worker", "client", "other")


def _role(proc) -> str | None:
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or unreadable
        return None
    if "dask-gateway-proxy" in name or "dask-gateway-proxy" in cmd:
        return "proxy"
    if "dask_scheduler" in cmd or "dask-scheduler" in cmd or "dask scheduler" in cmd:
        return "scheduler"
    if "dask_worker" in cmd or "dask-worker" in cmd or "dask worker" in cmd or "multiprocessing" in cmd:
        return "worker"
    return None


def cpu_snapshot(root_pid: int) -> dict:
    """CPU seconds (user + system) so far of the workbench's proxy, scheduler and worker processes (descendants of
    ``root_pid``), of this client process, and of the whole machine (busy = not idle/iowait)."""
    import psutil

    out = dict.fromkeys(ROLES, 0.0)
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        role = _role(proc)
        if role is None:
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[role] += t.user + t.system
    me = psutil.Process().cpu_times()
    out["client"] = me.user + me.system
    out["client_system"] = me.system  # of which in the kernel (socket reads, page faults)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["client_faults"] = ru.ru_minflt + ru.ru_majflt
    machine = psutil.cpu_times()
    out["machine_busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return out


def cpu_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in after}
    # CPU the machine spent on anything but this gather's four parties: the other tenants' load
    d["other"] = max(0.0, d["machine_busy"] - sum(d[r] for r in ROLES if r != "other"))
    return d


class ReadCounter:
    """In this process (both clients): tornado's TLS reads (``SSLIOStream.read_from_fd``: calls, bytes) and the
    event-loop wake-ups of its streams (``_handle_events``). Installed before the clients connect, so their
    streams register the counting handler. Read around one side's gather at a time: reads per wake-up and
    bytes per read tell whether the proxy hop hands the client its data in smaller pieces."""

    def __init__(self):
        from tornado import iostream

        self.calls = self.bytes = self.wakeups = 0
        read, events = iostream.SSLIOStream.read_from_fd, iostream.BaseIOStream._handle_events
        counter = self

        def read_from_fd(stream, buf):
            n = read(stream, buf)
            counter.calls += 1
            counter.bytes += n or 0
            return n

        def handle_events(stream, fd, ev):
            counter.wakeups += 1
            return events(stream, fd, ev)

        iostream.SSLIOStream.read_from_fd = read_from_fd
        iostream.BaseIOStream._handle_events = handle_events

    def snapshot(self) -> tuple[int, int, int]:
        return self.calls, self.bytes, self.wakeups

    @staticmethod
    def delta(before: tuple, after: tuple) -> dict:
        calls, nbytes, wakeups = (a - b for a, b in zip(after, before, strict=True))
        return {
            "reads": calls,
            "bytes": nbytes,
            "wakeups": wakeups,
            "kib_per_read": nbytes / 1024 / max(calls, 1),
            "reads_per_wakeup": calls / max(wakeups, 1),
        }


def data_runs(wb: Workbench, token: str, args) -> tuple[list[dict], dict]:
    import numpy as np
    from distributed import Client

    sizes = chunk_sizes(args.size_mb, args.chunk_mb)
    nbytes = 8 * sum(sizes)
    out: list[dict] = []
    info: dict = {}
    reads = ReadCounter()
    gw = wb.gateway(token)
    cluster = gclient = dclient = None
    try:
        options = gw.cluster_options()
        mem_max = options._fields["worker_memory"].max
        options.worker_memory = mem_max
        options.worker_cores = 1
        options.environment = dict(NO_SPILL)
        info["worker_memory_gib"] = mem_max
        say(
            f"worker_memory = {mem_max:g} GiB (the largest {USER}'s group may ask for"
            f"{'' if mem_max >= 3 else '; the issue suggests >= 3 GB, which the demo policy does not allow'})"
        )
        if nbytes / 2**30 > 0.7 * mem_max:
            say(f"warning: {nbytes / 2**30:.2f} GiB of data on a {mem_max:g} GiB worker is tight")
        cluster = gw.new_cluster(options)
        cluster.scale(1)
        gclient = cluster.get_client(set_as_default=False)
        gclient.wait_for_workers(1, timeout=READY_TIMEOUT)
        wb.snapshot()
        info["cluster"] = cluster.name
        info["scheduler_address"] = addr = scheduler_address(gclient)
        dclient = Client(addr, security=cluster.security, set_as_default=False, direct_to_workers=False, timeout=60)
        info["gateway_scheduler_address"] = gclient.scheduler.address
        say(f"cluster {cluster.name}: gateway client at {gclient.scheduler.address}, direct client at {addr}")
        say(f"{len(sizes)} chunk(s) of {sizes[0] * 8 / MIB:g} MiB = {nbytes / MIB:g} MiB per gather, per side")
        clients = {"gateway": gclient, "direct": dclient}
        # untimed warm-up: open both connections and deserialise once (1 MiB each way)
        warm = [gclient.submit(np.ones, MIB // 8, pure=False)]
        gclient.publish_dataset(**{"bench-warm-up": warm})
        timed_gather(gclient, warm, [MIB // 8])
        timed_gather(dclient, dclient.get_dataset("bench-warm-up"), [MIB // 8])
        gclient.unpublish_dataset("bench-warm-up")
        gclient.cancel(warm)
        # --warmup-runs full-size runs first, both sides, not counted: the first gigabyte a process moves pays
        # for memory this machine (a VM) has never backed yet, up to 4x the kernel time, and the first run is
        # always the gateway's (alternating order), so without them the ratio is biased against the gateway
        for i in range(-args.warmup_runs, args.runs):
            futs = [gclient.submit(np.ones, n, pure=False) for n in sizes]
            wait_on(gclient, futs)
            bad = [f for f in futs if f.status != "finished"]
            if bad:
                raise RuntimeError(f"making the data failed: {bad[0].exception()}")
            # the direct client gets its own futures of the same keys through a published dataset
            name = f"bench-data-{i}"
            gclient.publish_dataset(**{name: futs})
            dfuts = dclient.get_dataset(name)
            gclient.unpublish_dataset(name)
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            res: dict = {"order": list(order), "bytes": nbytes}
            try:
                for side in order:
                    before, read0 = cpu_snapshot(wb.proc.pid), reads.snapshot()
                    res[f"{side}_s"] = timed_gather(clients[side], futs if side == "gateway" else dfuts, sizes)
                    res[f"{side}_cpu"] = cpu_delta(before, cpu_snapshot(wb.proc.pid))
                    res[f"{side}_reads"] = reads.delta(read0, reads.snapshot())
            finally:
                dclient.cancel(dfuts)
                gclient.cancel(futs)
                del futs, dfuts
            for side in SIDES:
                res[f"{side}_mb_s"] = nbytes / 1e6 / res[f"{side}_s"]
            say(
                f"{'warm-up, not counted' if i < 0 else f'run {i + 1}/{args.runs}'} ({order[0]} first): "
                f"gateway {res['gateway_s']:.3f}s "
                f"({res['gateway_mb_s']:.0f} MB/s), direct {res['direct_s']:.3f}s ({res['direct_mb_s']:.0f} MB/s), "
                f"gateway/direct throughput {res['gateway_mb_s'] / res['direct_mb_s']:.2f}"
            )
            for side in SIDES:
                c = res[f"{side}_cpu"]
                say(
                    f"  {side:8} CPU s: proxy {c['proxy']:.2f}, scheduler {c['scheduler']:.2f}, worker {c['worker']:.2f}, "
                    f"client {c['client']:.2f} (kernel {c['client_system']:.2f}, {c['client_faults']} page faults), "
                    f"other tenants {c['other']:.2f}; machine busy {c['machine_busy']:.2f} "
                    f"of {2 * res[f'{side}_s']:.2f} core-s"
                )
                r = res[f"{side}_reads"]
                say(
                    f"  {side:8} client TLS reads: {r['reads']} ({r['kib_per_read']:.1f} KiB each), "
                    f"{r['wakeups']} wake-ups ({r['reads_per_wakeup']:.1f} reads each)"
                )
            if i >= 0:
                out.append(res)
    finally:
        for c in (dclient, gclient):
            if c is not None:
                try:
                    c.close()
                except Exception as e:  # noqa: BLE001 - still shut the cluster down
                    say(f"warning: closing a client: {e}")
        if cluster is not None:
            try:
                cluster.shutdown()
            finally:
                _forget_loop(getattr(cluster, "gateway", None))
        gw.close()
        _forget_loop(gw)
    if wb.proc is not None:
        wait_dask_gone(wb.proc.pid)
    return out, info


def summarise(runs: list[dict], nbytes: int) -> dict:
    out = {}
    for side in SIDES:
        times = [r[f"{side}_s"] for r in runs]
        med = statistics.median(times)
        out[side] = {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "median_mb_s": nbytes / 1e6 / med,
            "n": len(times),
        }
    for side in SIDES:
        gb = nbytes / 1e9
        out[side]["cpu_s_per_gb"] = {
            k: statistics.median(r[f"{side}_cpu"][k] / gb for r in runs if f"{side}_cpu" in r)
            for k in (*ROLES, "machine_busy")
            if all(f"{side}_cpu" in r for r in runs)
        }
    for side in SIDES:
        if all(f"{side}_reads" in r for r in runs):
            out[side]["client_reads"] = {
                "reads_per_gb": statistics.median(r[f"{side}_reads"]["reads"] / (nbytes / 1e9) for r in runs),
                "wakeups_per_gb": statistics.median(r[f"{side}_reads"]["wakeups"] / (nbytes / 1e9) for r in runs),
                "kib_per_read": statistics.median(r[f"{side}_reads"]["kib_per_read"] for r in runs),
                "reads_per_wakeup": statistics.median(r[f"{side}_reads"]["reads_per_wakeup"] for r in runs),
            }
    # throughput ratio = direct time / gateway time (medians); >= 0.9 is the target
    out["ratio_gateway_direct"] = out["direct"]["median_s"] / out["gateway"]["median_s"]
    return out


def print_summary(summary: dict, nbytes: int) -> None:
    print()
    print(f"client.gather of {nbytes / MIB:g} MiB     median s   min-max s       MB/s (median)")
    for side in SIDES:
        s = summary[side]
        print(
            f"  {side:8} {'(proxy hop)' if side == 'gateway' else '(no proxy)':12}"
            f"  {s['median_s']:8.3f}   {s['min_s']:.3f}-{s['max_s']:.3f}   {s['median_mb_s']:10.0f}"
        )
    print(
        "CPU seconds per GB gathered (median of runs): "
        + "; ".join(
            f"{side}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary[side].get("cpu_s_per_gb", {}).items())
            for side in SIDES
        )
    )
    for side in SIDES:
        c = summary[side].get("client_reads")
        if c:
            print(
                f"client TLS reads, {side}: {c['reads_per_gb']:.0f} per GB ({c['kib_per_read']:.1f} KiB each), "
                f"{c['wakeups_per_gb']:.0f} wake-ups per GB ({c['reads_per_wakeup']:.1f} reads each) (medians)"
            )
    r = summary["ratio_gateway_direct"]
    print(f"throughput ratio gateway / direct (medians): {r:.2f}  (target >= 0.90: {'met' if r >= 0.9 else 'NOT met'})")
    print()


def plot(path: str, runs: list[dict], summary: dict, nbytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(1, len(runs) + 1)
    for side, colour in (("gateway", "#b03030"), ("direct", "#3060a0")):
        ax.plot(xs, [r[f"{side}_mb_s"] for r in runs], "o-", color=colour, label=side)
        ax.axhline(summary[side]["median_mb_s"], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("run")
    ax.set_ylabel("MB/s")
    ax.set_xticks(list(xs))
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"client.gather of {nbytes / MIB:g} MiB: gateway / direct = {summary['ratio_gateway_direct']:.2f} (medians)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_dask_data.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs, each gathering on both sides (default 5)")
    p.add_argument("--size-mb", type=int, default=1024, help="MiB gathered per run and side (default 1024)")
    p.add_argument(
        "--warmup-runs", type=int, default=1, help="full-size runs before the timed ones, not counted (default 1)"
    )
    p.add_argument(
        "--chunk-mb",
        type=int,
        default=256,
        help="MiB per array and per gather call (default 256; a scheduler may hold 1 GiB, see above)",
    )
    p.add_argument("--json", metavar="FILE", help="write raw timings, medians and the ratio to FILE")
    p.add_argument("--plot", metavar="PNG", help="draw MB/s per run and side into PNG")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder under /tmp")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.size_mb < 1:
        p.error("--size-mb must be at least 1")
    if args.chunk_mb < 1:
        p.error("--chunk-mb must be at least 1")
    args.chunk_mb = min(args.chunk_mb, args.size_mb)
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (VENV_BIN / "workbench").exists():
        print(f"run this with the project's venv (.venv/bin/python); {VENV_BIN} has no workbench", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    root = make_state_dir("wb-bench-data-")
    say(
        f"state folder {root}; {args.runs} run(s) of {args.size_mb} MiB (chunks of {args.chunk_mb} MiB); "
        f"{os.cpu_count()} CPUs"
    )
    ok = False
    wb: Workbench | None = None
    runs: list[dict] = []
    info: dict = {}
    try:
        wb = Workbench(root / "workbench-state")
        say("starting `workbench up` …")
        wb.start()
        say(f"workbench ready at {wb.url}")
        s = wb.login(USER)
        if s.login_status != 302:
            raise RuntimeError(f"workbench login as {USER} answered {s.login_status}")
        token = wb.new_token(s, USER)
        runs, info = data_runs(wb, token, args)
        say("stopping the workbench …")
        code = wb.stop()
        leftovers = wb.leftovers()
        if code != 0 or leftovers:
            say(f"warning: workbench up exited with {code}; leftovers: {leftovers}")
        wb = None
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
        if ok and not args.keep_state:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"state and logs kept in {root}")
    if not ok:
        return 130

    nbytes = runs[0]["bytes"]
    summary = summarise(runs, nbytes)
    print_summary(summary, nbytes)
    total = time.monotonic() - T_START
    say(f"done in {total:.1f}s")
    results = {
        "runs": runs,
        "summary": summary,
        "cluster": info,
        "meta": {
            "runs": args.runs,
            "size_mb": args.size_mb,
            "chunk_mb": args.chunk_mb,
            "user": USER,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "python": platform.python_version(),
            "as_root": os.geteuid() == 0,
            "versions": versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": total,
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, runs, summary, nbytes)
        say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
