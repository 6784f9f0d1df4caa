"""Start slots (workbench.spawn.concurrency): at most `limit` starts at once, first come first served, queue
positions as progress events, the timers of a queued start. The "server" is a real tornado HTTP server in this
process (a stand-in for JupyterLab, whose start-up is what the slots ration)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from tornado import web
from traitlets.config import Config

from workbench.embedded.hub import configure_hub
from workbench.runtime import Runtime
from workbench.spawn import concurrency
from workbench.spawn.concurrency import (
    StartSlotMixin,
    StartSlots,
    StartSlotsError,
    hub_start_timeout,
    machine_capacity,
    start_slots_from_env,
)

REPO = Path(__file__).resolve().parents[2]


def test_capacity_follows_cores_and_memory():
    assert machine_capacity(cpus=2, memory=64 * 2**30) == 2
    assert machine_capacity(cpus=16, memory=2 * 2**30) == 4  # memory-bound: 512 MiB per start
    assert machine_capacity(cpus=0.5, memory=2**20) == 1
    assert machine_capacity() >= 1


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        StartSlots(0)


def test_first_come_first_served_with_positions():
    async def main():
        slots = StartSlots(2)
        tickets = [slots.ticket() for _ in range(5)]
        assert [t.done() for t in tickets] == [True, True, False, False, False]
        assert [slots.ahead_of(t) for t in tickets] == [None, None, 0, 1, 2]
        slots.leave(tickets[3])  # gave up while waiting
        assert slots.ahead_of(tickets[4]) == 1
        slots.release()
        assert tickets[2].done() and slots.ahead_of(tickets[4]) == 0
        slots.release()
        assert tickets[4].done() and slots.running == 2 and slots.peak == 2

    asyncio.run(main())


class _Base:
    """What StartSlotMixin needs of JupyterHub's Spawner; start() answers once its server is listening."""

    _log_name = "u"

    def __init__(self, **kw):
        self.server = SimpleNamespace(base_url="/user/u/")
        self._spawn_pending = True

    async def start(self):
        self.counter["now"] += 1
        self.counter["max"] = max(self.counter["max"], self.counter["now"])
        await asyncio.sleep(self.delay)
        return ("127.0.0.1", self.port)

    async def progress(self):
        yield {"progress": 50, "message": "Spawning server..."}


class _Spawner(StartSlotMixin, _Base):
    def __init__(self, port, delay, counter, **kw):
        super().__init__(**kw)
        self.port, self.delay, self.counter = port, delay, counter

    async def _start_until_up(self):
        try:
            return await super()._start_until_up()
        finally:
            self.counter["now"] -= 1


@pytest.fixture
def fresh_slots(monkeypatch):
    monkeypatch.setattr(concurrency, "_SLOTS", {})


def test_burst_waits_in_line_and_all_start(fresh_slots):
    async def main():
        app = web.Application([(r"/user/u/.*", type("H", (web.RequestHandler,), {"get": lambda self: None}))])
        server = app.listen(0, address="127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        counter = {"now": 0, "max": 0}
        spawners = [_Spawner(port, 0.2, counter, start_slots=2) for _ in range(8)]
        events = {i: [] for i in range(8)}

        async def watch(i):
            async for e in spawners[i].progress():
                events[i].append(e["message"])

        starts = [asyncio.ensure_future(s.start()) for s in spawners]
        watchers = [asyncio.ensure_future(watch(i)) for i in range(8)]
        results = await asyncio.gather(*starts)
        await asyncio.gather(*watchers)
        server.stop()
        return results, counter, events, concurrency._SLOTS[0]

    results, counter, events, slots = asyncio.run(main())
    assert len(results) == 8
    assert counter["max"] == 2 and slots.peak == 2 and slots.granted == 8 and slots.running == 0
    assert events[7][0] == "waiting for a start slot: 5 ahead of you"
    waits = [int(m.split(": ")[1].split()[0]) for m in events[7] if m.startswith("waiting")]
    assert len(waits) >= 2 and waits == sorted(set(waits), reverse=True)  # the place moves up as slots free
    assert events[7][-2:] == ["start slot granted, starting your server", "Spawning server..."]
    assert events[0] == ["start slot granted, starting your server", "Spawning server..."]


def test_queue_timeout_says_so_and_leaves_the_line(fresh_slots):
    async def main():
        counter = {"now": 0, "max": 0}
        slots = concurrency.shared_slots(1)
        holder = slots.ticket()  # someone else starts and never finishes
        s = _Spawner(1, 0, counter, start_slots=1, start_queue_timeout=0.2)
        with pytest.raises(TimeoutError, match="No start slot became free in 0.2 s"):
            await s.start()
        assert slots.waiting == 0 and holder.done()

    asyncio.run(main())


def test_server_that_never_answers_times_out_after_its_slot_and_frees_it(fresh_slots):
    async def main():
        counter = {"now": 0, "max": 0}
        s = _Spawner(9, 0, counter, start_slots=1, slot_start_timeout=0.5)  # nothing listens on port 9
        with pytest.raises(TimeoutError, match="did not answer within 0.5 s"):
            await s.start()
        assert concurrency._SLOTS[0].running == 0

    asyncio.run(main())


def test_hub_timer_covers_queue_and_start():
    assert hub_start_timeout(900, 120) > 900 + 120


def test_start_slots_from_env():
    assert start_slots_from_env({}) is None
    assert start_slots_from_env({"WORKBENCH_START_SLOTS": " "}) is None
    assert start_slots_from_env({"WORKBENCH_START_SLOTS": "0"}) == 0  # from the machine
    assert start_slots_from_env({"WORKBENCH_START_SLOTS": "4"}) == 4
    for bad in ("four", "-1", "2.5"):
        with pytest.raises(StartSlotsError) as e:
            start_slots_from_env({"WORKBENCH_START_SLOTS": bad})
        msg = str(e.value)
        assert f"WORKBENCH_START_SLOTS={bad!r}" in msg
        assert "whole number of servers that may start at once (e.g. 4)" in msg and "or 0 to follow the machine" in msg


def _runtime(tmp_path) -> Runtime:
    return Runtime(
        config=str(REPO / "hub_config" / "demo.yaml"),
        state_dir=str(tmp_path),
        hub_config_dir=str(REPO / "hub_config"),
        venv_bin="/srv/wb/.venv/bin",
        proxy_command="/usr/bin/configurable-http-proxy",
        sessions_port=18015,
        rosters_port=18016,
    )


def test_hub_takes_the_limit_from_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_START_SLOTS", "3")
    c = Config()
    configure_hub(c, _runtime(tmp_path))
    assert c.WorkbenchLocalSpawner.start_slots == 3
    assert c.JupyterHub.concurrent_spawn_limit >= 1000  # the slots queue; no 429 for a class

    monkeypatch.delenv("WORKBENCH_START_SLOTS")
    c = Config()
    configure_hub(c, _runtime(tmp_path))
    assert "start_slots" not in c.WorkbenchLocalSpawner  # 0, the trait's default: from the machine


def test_hub_refuses_a_bad_limit_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_START_SLOTS", "lots")
    with pytest.raises(SystemExit) as e:
        configure_hub(Config(), _runtime(tmp_path))
    assert e.value.code == 2
    assert "workbench: WORKBENCH_START_SLOTS='lots': must be a whole number" in capsys.readouterr().err


def test_next_start_of_the_same_spawner_takes_a_new_ticket(fresh_slots):
    async def main():
        app = web.Application([(r"/user/u/.*", type("H", (web.RequestHandler,), {"get": lambda self: None}))])
        server = app.listen(0, address="127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        s = _Spawner(port, 0, {"now": 0, "max": 0}, start_slots=1)
        await s.start()
        assert s._slot_ticket is None  # an old, granted ticket would make progress() report the next start granted
        await s.start()
        server.stop()
        return concurrency._SLOTS[0]

    slots = asyncio.run(main())
    assert slots.granted == 2 and slots.running == 0
