"""WorkbenchHub (workbench.hubapp): the hub's managed services start at once, failures still stop the hub.

The start of one service (``WorkbenchHub._start_one``: start the process, wait for its URL) is replaced by a
stand-in per test (the last test starts a real hub with real service processes); ``WorkbenchHub.start_service`` is driven the way upstream ``JupyterHub.start()`` drives
it: one call per service, in the service map's order, each awaited before the next, and ``exit(1)`` when
a managed one returns False. The last test runs the real ``init_db`` on SQLite files (``sqlite_wal``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from jupyterhub.app import JupyterHub

from workbench.hubapp import WorkbenchHub


class StandInService:
    """What start_service and the failure path use of a jupyterhub Service: managed, spawner, stop()."""

    def __init__(self, name: str, managed: bool = True):
        self.name, self.managed, self.spawner = name, managed, None
        self.stopped = False

    async def stop(self):
        self.stopped = True


def hub_with(names: list[str]) -> WorkbenchHub:
    hub = WorkbenchHub()
    hub._service_map = {n: StandInService(n) for n in names}
    return hub


async def upstream_start_loop(hub: WorkbenchHub) -> dict[str, bool]:
    """Upstream start()'s service loop (jupyterhub/app.py, JupyterHub.start), under start()'s flag."""
    hub._starting_up = True
    results = {}
    try:
        for name, service in hub._service_map.items():
            results[name] = await hub.start_service(name, service, None)
            if not results[name] and service.managed:
                break  # upstream: self.exit(1)
    finally:
        hub._starting_up = False
        hub._service_starts = None
    return results


def test_service_starts_overlap(monkeypatch):
    """Each stand-in answers only once every service's start has begun: one after the other never gets there."""
    names = ["dask-gateway", "quota", "sessions", "rosters", "jobs", "dask-dashboards"]
    begun: set[str] = set()

    async def run():
        all_begun = asyncio.Event()

        async def stand_in(self, name, service, ssl_context=None):
            begun.add(name)
            service.spawner = object()
            if begun == set(names):
                all_begun.set()
            await asyncio.wait_for(all_begun.wait(), 30)
            return True

        monkeypatch.setattr(WorkbenchHub, "_start_one", stand_in)
        return await upstream_start_loop(hub_with(names))

    assert asyncio.run(run()) == {n: True for n in names}
    assert begun == set(names)


def test_each_call_gets_its_own_services_result(monkeypatch):
    """An external (unmanaged) service that does not answer gives False for it alone; start-up goes on."""

    async def stand_in(self, name, service, ssl_context=None):
        await asyncio.sleep(0)
        return name != "external"

    monkeypatch.setattr(WorkbenchHub, "_start_one", stand_in)
    hub = hub_with(["a", "external", "b"])
    hub._service_map["external"].managed = False
    assert asyncio.run(upstream_start_loop(hub)) == {"a": True, "external": False, "b": True}
    assert not any(s.stopped for s in hub._service_map.values())


def test_failed_managed_service_stops_the_others_and_the_hub_exits(monkeypatch):
    """A managed service that fails gives False (start() then exits the hub); what was started is stopped first."""
    cancelled = []

    async def stand_in(self, name, service, ssl_context=None):
        service.spawner = object()  # its process was started
        if name == "broken":
            return False
        if name == "slow":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
        return True

    monkeypatch.setattr(WorkbenchHub, "_start_one", stand_in)
    hub = hub_with(["first", "broken", "slow"])
    results = asyncio.run(upstream_start_loop(hub))
    assert results == {"first": True, "broken": False}
    assert cancelled == ["slow"]
    assert all(s.stopped for s in hub._service_map.values())


def test_after_start_up_start_service_is_upstreams(monkeypatch):
    """Outside start() (a later restart) only the named service is started."""
    started = []

    async def stand_in(self, name, service, ssl_context=None):
        started.append(name)
        return True

    monkeypatch.setattr(JupyterHub, "start_service", stand_in)
    hub = hub_with(["a", "b", "c"])
    assert asyncio.run(hub.start_service("b", hub._service_map["b"])) is True
    assert started == ["b"]


def test_real_start_exits_the_hub_when_a_managed_service_fails(tmp_path: Path):
    """A real WorkbenchHub start (the launcher `hub_config/jupyterhub`, real proxy): one managed service
    listens; the other listens, answers 502 for 3 s, then exits (well within the 30 s it would be given to
    answer): the hub notices the exit, exits with 1, and the listening one's process is gone."""
    import os
    import socket
    import subprocess
    import sys

    import psutil

    import workbench
    from workbench.embedded.up import find_proxy

    proxy = find_proxy(Path(sys.executable).parent)
    assert proxy, "configurable-http-proxy not installed (make test installs it into .venv)"

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ok_port, hub_port, api_port, proxy_port = (free_port() for _ in range(4))
    pidfile = tmp_path / "ok.pid"
    ok_cmd = [
        sys.executable,
        "-c",
        f"import os, http.server; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
        f"http.server.HTTPServer(('127.0.0.1', {ok_port}), http.server.SimpleHTTPRequestHandler).serve_forever()",
    ]
    # listens, answers 502 (as the gateway's guard does until dask-gateway-server is up), then exits with 1
    bad_port = free_port()
    bad_cmd = [
        sys.executable,
        "-c",
        "import http.server, os, threading\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(502); self.end_headers()\n"
        f"s = http.server.HTTPServer(('127.0.0.1', {bad_port}), H)\n"
        "threading.Timer(3, lambda: os._exit(1)).start()\n"
        "s.serve_forever()\n",
    ]
    cfg = tmp_path / "config.py"
    cfg.write_text(
        "c.JupyterHub.authenticator_class = 'dummy'\n"
        f"c.JupyterHub.bind_url = 'http://127.0.0.1:{hub_port}'\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{api_port}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{proxy_port}'\n"
        f"c.ConfigurableHTTPProxy.command = [{proxy!r}]\n"
        f"c.JupyterHub.db_url = 'sqlite:///{tmp_path}/hub.sqlite'\n"
        f"c.JupyterHub.cookie_secret_file = '{tmp_path}/secret'\n"
        f"c.JupyterHub.pid_file = '{tmp_path}/hub.pid'\n"
        "c.JupyterHub.services = [\n"
        f"  {{'name': 'ok', 'url': 'http://127.0.0.1:{ok_port}', 'command': {ok_cmd!r}}},\n"
        f"  {{'name': 'broken', 'url': 'http://127.0.0.1:{bad_port}', 'command': {bad_cmd!r}}},\n"
        "]\n"
    )
    launcher = Path(workbench.__file__).parent / "hub_config" / "jupyterhub"
    log = tmp_path / "hub.log"
    with log.open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, str(launcher), "-f", str(cfg)],
            cwd=tmp_path,
            stdout=out_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=180)
    finally:
        out = log.read_text(errors="replace")
        for p in psutil.process_iter():  # what the hub left in its session (its proxy: upstream leaves it)
            try:
                if os.getsid(p.pid) == proc.pid:
                    p.kill()
            except (OSError, psutil.Error):
                pass
    assert proc.returncode == 1, out
    assert "Starting 2 services at once: ok, broken" in out, out
    assert "Service broken exited with status 1" in out, out
    assert "Cannot connect to managed service broken" not in out, out  # its exit ended the wait, not the timeout
    if pidfile.exists():  # the ok service had started: it must have been stopped with the hub
        pid = int(pidfile.read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, out


def test_the_hub_logs_as_jupyterhub_like_upstream():
    """Traitlets names an application's logger after its class; the subclass keeps upstream's name, which log
    filters (and the tests reading the hub's access log) look for."""
    hub = WorkbenchHub()
    assert hub.log.name == "JupyterHub"
    assert "JupyterHub" in hub.get_default_logging_config()["loggers"]
    assert "WorkbenchHub" not in hub.get_default_logging_config()["loggers"]


def test_sqlite_wal_gives_the_hub_database_commits_without_an_fsync_each(tmp_path: Path):
    """A real WorkbenchHub.init_db on a real SQLite file: with sqlite_wal (the embedded mode's setting) every
    connection of the hub's engine runs WAL with synchronous=NORMAL, also one made after init_db; without it,
    upstream's rollback journal with synchronous=FULL."""
    from sqlalchemy import text

    def pragmas(hub) -> tuple[str, int]:
        with hub.session_factory.kw["bind"].connect() as c:  # a fresh pooled connection, not the session's
            return c.execute(text("PRAGMA journal_mode")).scalar(), c.execute(text("PRAGMA synchronous")).scalar()

    wal = WorkbenchHub(db_url=f"sqlite:///{tmp_path / 'wal.sqlite'}", sqlite_wal=True)
    wal.init_db()
    wal.db.execute(text("SELECT 1"))  # the session's own connection
    assert wal.db.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert pragmas(wal) == ("wal", 1)
    plain = WorkbenchHub(db_url=f"sqlite:///{tmp_path / 'plain.sqlite'}")
    plain.init_db()
    assert pragmas(plain) == ("delete", 2)  # FULL
