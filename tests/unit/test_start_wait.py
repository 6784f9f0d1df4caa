"""How a start slot waits for its server (StartSlotMixin._wait_answering in workbench.spawn.concurrency).

The "server" is a real tornado HTTP server in this process that starts listening late (a stand-in for JupyterLab);
the spawner is a stand-in for JupyterHub's Spawner (start() returns the address at once, poll() the process's
status), as in test_start_slots.py.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import jupyterhub.utils
import pytest
from tornado import web

from workbench.spawn import concurrency
from workbench.spawn.concurrency import StartSlotMixin


class _Base:
    _log_name = "u"

    def __init__(self, **kw):
        self.server = SimpleNamespace(base_url="/user/u/")
        self._spawn_pending = True
        self.exit_status = None
        self.polls = 0

    async def start(self):
        return ("127.0.0.1", self.port)

    async def poll(self):
        self.polls += 1
        return self.exit_status

    async def progress(self):
        yield {"progress": 50, "message": "Spawning server..."}


class _Spawner(StartSlotMixin, _Base):
    def __init__(self, port, **kw):
        super().__init__(**kw)
        self.port = port


@pytest.fixture(autouse=True)
def fresh_slots(monkeypatch):
    monkeypatch.setattr(concurrency, "_SLOTS", {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_http_check_once_the_server_listens(monkeypatch):
    """While nothing listens the slot only tries to connect; the HTTP check runs once, when the server is there
    (JupyterHub's backoff alone sent one HTTP check per try, with random waits of up to 5 s between them)."""
    fetched = []
    real_fetch = jupyterhub.utils.fetch

    async def counting_fetch(url, **kw):
        fetched.append(url)
        return await real_fetch(url, **kw)

    monkeypatch.setattr(jupyterhub.utils, "fetch", counting_fetch)
    port = free_port()
    hits = []

    class H(web.RequestHandler):
        def get(self):
            hits.append(self.request.path)

    async def main():
        s = _Spawner(port, start_slots=1)
        start = asyncio.ensure_future(s.start())
        for _ in range(600):  # until the slot has tried to connect for a second: the server is still not there
            if s.polls or start.done():
                break
            await asyncio.sleep(0.05)
        assert s.polls, "the slot never polled the server's process while waiting for it"
        assert not start.done() and fetched == []
        server = web.Application([(r"/user/u/.*", H)]).listen(port, address="127.0.0.1")
        try:
            assert await asyncio.wait_for(start, 30) == ("127.0.0.1", port)
        finally:
            server.stop()
        return concurrency._SLOTS[0]

    slots = asyncio.run(main())
    assert fetched == [f"http://127.0.0.1:{port}/user/u/"] and hits == ["/user/u/"]
    assert slots.running == 0


def test_server_that_exits_frees_its_slot_with_its_status():
    """A server process that dies before answering ends the start with its status, not after slot_start_timeout."""

    async def main():
        s = _Spawner(free_port(), start_slots=1, slot_start_timeout=3600)
        s.exit_status = 1
        with pytest.raises(RuntimeError, match="The server exited with status 1 before it answered"):
            await asyncio.wait_for(s.start(), 60)
        return concurrency._SLOTS[0]

    slots = asyncio.run(main())
    assert slots.running == 0
