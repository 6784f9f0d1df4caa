"""Prometheus metrics of the quota service, read from the ledger at each scrape.

Usage counters come from the database (closed rows summed there, running rows up to now), so
they are the same from any replica and survive restarts; budget and running gauges are per
group and GPU type. Counters of this process (admissions, events) sit beside them.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from workbench.services.quota.accounting import budget_period, usage_in_period
from workbench.services.quota.ledger import Ledger

PREFIX = "workbench_quota"


class LedgerCollector:
    """A prometheus_client collector over a :class:`Ledger` (its policy gives budgets and caps)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def collect(self):
        ledger = self.ledger
        policy = ledger.policy
        now: datetime = ledger.clock()
        gpu_total = CounterMetricFamily(
            f"{PREFIX}_gpu_seconds",
            "GPU-seconds used since the ledger began (running items up to now)",
            labels=["group", "gpu_type", "kind"],
        )
        cpu_total = CounterMetricFamily(
            f"{PREFIX}_cpu_seconds",
            "CPU core-seconds used since the ledger began (running items up to now)",
            labels=["group", "kind"],
        )
        gpu: dict[tuple, float] = {}
        cpu: dict[tuple, float] = {}
        for group, kind, gpu_type, gpu_s, cpu_s in ledger.closed_totals():
            if gpu_type:
                gpu[(group, gpu_type, kind)] = gpu.get((group, gpu_type, kind), 0.0) + gpu_s
            cpu[(group, kind)] = cpu.get((group, kind), 0.0) + cpu_s
        running = ledger.open_rows()
        for r in running:
            seconds = max(0.0, (now - r.start).total_seconds())
            if r.gpu_type and r.gpu_count:
                key = (r.group, r.gpu_type, r.kind)
                gpu[key] = gpu.get(key, 0.0) + seconds * r.gpu_count
            cpu[(r.group, r.kind)] = cpu.get((r.group, r.kind), 0.0) + seconds * r.cpu
        for labels, v in sorted(gpu.items()):
            gpu_total.add_metric(list(labels), v)
        for labels, v in sorted(cpu.items()):
            cpu_total.add_metric(list(labels), v)
        yield gpu_total
        yield cpu_total

        run_gpus = GaugeMetricFamily(f"{PREFIX}_running_gpus", "GPUs held now", labels=["group", "gpu_type"])
        run_servers = GaugeMetricFamily(f"{PREFIX}_running_servers", "notebook servers running now", labels=["group"])
        gpus_now: dict[tuple, int] = {}
        servers_now: dict[str, int] = {g: 0 for g in (policy.groups if policy else {})}
        for r in running:
            if r.gpu_type and r.gpu_count:
                gpus_now[(r.group, r.gpu_type)] = gpus_now.get((r.group, r.gpu_type), 0) + r.gpu_count
            if r.kind == "server":
                servers_now[r.group] = servers_now.get(r.group, 0) + 1
        for labels, v in sorted(gpus_now.items()):
            run_gpus.add_metric(list(labels), v)
        for g, v in sorted(servers_now.items()):
            run_servers.add_metric([g], v)
        yield run_gpus
        yield run_servers

        if policy is None:
            return
        limit = GaugeMetricFamily(
            f"{PREFIX}_budget_limit_hours", "budget of the current period", labels=["group", "resource", "period"]
        )
        used = GaugeMetricFamily(
            f"{PREFIX}_budget_used_hours", "budget used in the current period", labels=["group", "resource", "period"]
        )
        ratio = GaugeMetricFamily(
            f"{PREFIX}_budget_used_ratio", "used / limit in the current period", labels=["group", "resource"]
        )
        by_type = GaugeMetricFamily(
            f"{PREFIX}_period_gpu_hours", "GPU-hours in the group's current budget period", labels=["group", "gpu_type"]
        )
        caps = GaugeMetricFamily(f"{PREFIX}_cap", "concurrency caps", labels=["group", "cap"])
        for name, g in policy.groups.items():
            if g.caps is not None:
                for cap, value in g.caps.model_dump().items():
                    if value is not None:
                        caps.add_metric([name, cap], value)
            if g.budget is None:
                continue
            period = budget_period(g.budget.period, now, g.budget.term_starts)
            rows = ledger.rows(period, now, group=name)
            usage = usage_in_period(rows, period, now)
            for t, s in sorted(usage.gpu_seconds_by_type.items()):
                by_type.add_metric([name, t], s / 3600)
            for res, lim, val in (
                ("gpu", g.budget.gpu_hours, usage.gpu_hours),
                ("cpu", g.budget.cpu_hours, usage.cpu_hours),
            ):
                if lim is None:
                    continue
                limit.add_metric([name, res, g.budget.period], lim)
                used.add_metric([name, res, g.budget.period], val)
                ratio.add_metric([name, res], val / lim if lim else 1.0)
        yield limit
        yield used
        yield ratio
        yield by_type
        yield caps


class QuotaMetrics:
    """The registry of one quota service: the ledger collector and this process's counters."""

    def __init__(self, ledger: Ledger):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(ledger))
        self.admissions = Counter(
            f"{PREFIX}_admissions", "admission decisions of this process", ["result", "reason"], registry=self.registry
        )
        self.events = Counter(f"{PREFIX}_events", "events received by this process", ["status"], registry=self.registry)
        self.stops = Counter(
            f"{PREFIX}_budget_stops",
            "servers stopped by this process because a budget was spent",
            ["kind", "reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
