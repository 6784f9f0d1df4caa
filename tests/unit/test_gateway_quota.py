"""The gateway's side of the quota service (workbench.gateway.local.ClusterCapMixin): what it reports as running,
what each item holds, and which clusters it stops — with dask-gateway's own JobStatus and a stand-in for its
in-memory cluster records and for the quota service (the real ones run in tests/integration)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from dask_gateway_server.backends.db_base import DBBackendBase, JobStatus
from dask_gateway_server.utils import FrozenAttrDict

from workbench.gateway.local import WorkbenchUnsafeLocalBackend
from workbench.gateway.quota import CHARGE_KEY, scheduler_item, worker_item

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"
GIB = 2**30


def cluster(name, status=JobStatus.RUNNING, workers=(), **config):
    c = SimpleNamespace(
        name=name,
        username="researcher",
        status=status,
        target=JobStatus.RUNNING,
        start_time=1_780_000_000_000,
        workers={},
        config=FrozenAttrDict(
            {
                CHARGE_KEY: "physics-lab",
                "worker_cores": 1,
                "worker_memory": GIB,
                "scheduler_cores": 1,
                "scheduler_memory": GIB,
                **config,
            }
        ),
    )
    for wname, wstatus in workers:
        c.workers[wname] = SimpleNamespace(name=wname, status=wstatus, start_time=1_780_000_001_000, cluster=c)
    return c


class FakeQuota:
    def __init__(self, plan):
        self.plan, self.reconciled = plan, []

    async def reconcile(self, kinds, items):
        self.reconciled.append((kinds, items))
        return {}

    async def enforcement(self, kinds=None):
        return self.plan


def backend(clusters):
    b = WorkbenchUnsafeLocalBackend(policy_path=str(DEMO), quota_api_url="http://q/api", quota_api_token="t")
    by_name = {c.name: c for c in clusters}
    b.db = SimpleNamespace(
        active_clusters=lambda: [c for c in clusters if c.status < JobStatus.STOPPED], get_cluster=by_name.get
    )
    b.stopped = []

    async def stop_cluster(name, failed=False):
        b.stopped.append((name, failed))

    b.stop_cluster = stop_cluster
    return b


def test_running_items_are_schedulers_and_started_workers_with_their_resources():
    c = cluster(
        "c1",
        workers=[
            ("w-run", JobStatus.RUNNING),
            ("w-sub", JobStatus.SUBMITTED),
            ("w-new", JobStatus.CREATED),
            ("w-old", JobStatus.STOPPED),
        ],
    )
    gone = cluster("c2", status=JobStatus.STOPPED)
    items = backend([c, gone]).running_items()
    assert [i["item"] for i in items] == ["dask-scheduler:c1", "dask-worker:c1/w-run", "dask-worker:c1/w-sub"]
    sched, worker = items[0], items[1]
    assert sched == {
        "item": "dask-scheduler:c1",
        "kind": "dask-scheduler",
        "user": "researcher",
        "group": "physics-lab",
        "cpu": 1.0,
        "memory": GIB,
        "started": "2026-05-28T20:26:40+00:00",
        "confirmed": False,  # not seen alive by this process (no heartbeat yet, not started by it)
    }
    assert worker["kind"] == "dask-worker" and worker["cpu"] == 1.0 and worker["gpu_count"] == 0
    assert "gpu_type" not in worker  # a CPU worker holds no GPU


def test_gpu_workers_hold_the_groups_dask_gpu_type():
    # physics-lab's dask section has no gpu_workers in the demo; a cluster config with GPUs still names the type
    c = cluster("g1", workers=[("w", JobStatus.RUNNING)], worker_gpus=2)
    b = backend([c])
    res = b._resources(c, c.workers["w"])
    assert res["gpu_count"] == 2 and res["gpu_type"] == b.policy.groups["physics-lab"].dask.gpu_type


def test_a_round_reconciles_then_stops_only_due_clusters_once(monkeypatch):
    c1 = cluster("c1", workers=[("a", JobStatus.RUNNING), ("b", JobStatus.RUNNING)])
    c2 = cluster("c2")
    plan = [
        {"item": worker_item("c1", "a"), "due": True, "message": "CPU budget of group physics-lab is spent"},
        {"item": worker_item("c1", "b"), "due": True, "message": "same cluster: stopped once"},
        {"item": scheduler_item("c2"), "due": False, "message": "still in its grace period"},
        {"item": scheduler_item("gone"), "due": True, "message": "no longer known here"},
    ]
    b = backend([c1, c2])
    fake = FakeQuota(plan)
    monkeypatch.setattr(WorkbenchUnsafeLocalBackend, "quota", property(lambda self: fake))
    assert asyncio.run(b.quota_round()) == ["c1"]
    assert b.stopped == [("c1", True)]
    ((kinds, items),) = fake.reconciled
    assert kinds == ["dask-scheduler", "dask-worker"] and len(items) == 4  # 2 schedulers + 2 workers


def test_stop_events_in_flight_survive_a_cancel_and_are_flushed_before_exit(monkeypatch):
    """Issue 16: a cluster stopped just before the gateway is told to exit. Its stop event is sent in a task of its
    own: cancelling the reconciler that sent it (the shutdown) does not cancel the event, and the backend's clean-up
    waits for it before the gateway exits. The quota service is a stand-in that answers when the test lets it."""
    b = backend([])
    delivered, gate = [], None

    class SlowQuota:
        async def stop_many(self, items, tries=3, delay=1.0):
            await gate.wait()
            delivered.extend(items)
            return True

    monkeypatch.setattr(WorkbenchUnsafeLocalBackend, "quota", property(lambda self: SlowQuota()))

    async def run():
        nonlocal gate
        gate = asyncio.Event()
        sender = asyncio.ensure_future(b._send_stops([scheduler_item("c1"), worker_item("c1", "w")]))
        await asyncio.sleep(0)
        sender.cancel()  # the shutdown cancels what was running
        await asyncio.gather(sender, return_exceptions=True)
        assert delivered == []
        asyncio.get_running_loop().call_later(0.05, gate.set)  # the service answers a moment later
        assert await b.flush_quota_stops(timeout=30) == 1
        return list(delivered)

    assert asyncio.run(run()) == ["dask-scheduler:c1", "dask-worker:c1/w"]


def test_after_a_restart_only_what_a_heartbeat_shows_alive_is_confirmed_and_the_dead_get_no_stop_event(monkeypatch):
    """Issue 16: a restarted gateway lists what its database calls running as unconfirmed (its rows are not marked
    seen) until a scheduler heartbeat shows it alive. A worker found dead gets no stop event at that (later) time:
    it is left out of a reconcile sent at once, so the ledger closes its row at its last seen. A worker confirmed
    alive gets its stop event as before. The quota service is a stand-in; the real one runs in
    tests/integration/test_claims_quota.py."""
    c1 = cluster("c1", workers=[("alive", JobStatus.RUNNING), ("dead", JobStatus.RUNNING)])
    b = backend([c1])
    stops = []

    class Quota(FakeQuota):
        async def stop_many(self, items, tries=3, delay=1.0):
            stops.extend(items)
            return True

    fake = Quota([])
    monkeypatch.setattr(WorkbenchUnsafeLocalBackend, "quota", property(lambda self: fake))
    assert {i["item"]: i["confirmed"] for i in b.running_items()} == {
        "dask-scheduler:c1": False,
        "dask-worker:c1/alive": False,
        "dask-worker:c1/dead": False,
    }

    async def heartbeat_seen(self, cluster_name, msg):  # dask-gateway's own handling is not under test here
        return None

    monkeypatch.setattr(DBBackendBase, "on_cluster_heartbeat", heartbeat_seen)
    msg = {"active_workers": ["alive"], "closing_workers": [], "closed_workers": ["dead"]}
    asyncio.run(b.on_cluster_heartbeat("c1", msg))
    assert {i["item"]: i["confirmed"] for i in b.running_items()} == {
        "dask-scheduler:c1": True,
        "dask-worker:c1/alive": True,
        "dask-worker:c1/dead": False,
    }
    asyncio.run(b._record_stops([worker_item("c1", "dead")]))
    assert stops == []
    ((_, items),) = fake.reconciled
    assert [i["item"] for i in items] == ["dask-scheduler:c1", "dask-worker:c1/alive"]
    asyncio.run(b._record_stops([worker_item("c1", "alive")]))
    assert stops == ["dask-worker:c1/alive"] and len(fake.reconciled) == 1


def test_items_found_dead_are_forgotten_once_the_database_no_longer_lists_them(monkeypatch):
    """The set of items found dead after a restart only keeps them out of reconciles while dask-gateway's database
    still calls them active; once their cluster or worker is stopped there, they leave the set (it would otherwise
    grow for the gateway's lifetime). Stand-in quota service and database, as above."""
    c1 = cluster("c1", workers=[("dead", JobStatus.RUNNING), ("alive", JobStatus.RUNNING)])
    b = backend([c1])
    fake = FakeQuota([])
    monkeypatch.setattr(WorkbenchUnsafeLocalBackend, "quota", property(lambda self: fake))
    asyncio.run(b._record_stops([worker_item("c1", "dead"), scheduler_item("gone")]))
    assert b._dead_items() == {worker_item("c1", "dead")}  # "gone" is not in the database: forgotten at once
    assert "dask-worker:c1/dead" not in [i["item"] for i in b.running_items()]
    c1.status = JobStatus.STOPPED
    assert b.running_items() == [] and b._dead_items() == set()
