"""The hub application every engine runs: JupyterHub that starts its managed services at once.

JupyterHub 6.1's ``start()`` starts the hub's services one after the other
(``for name, service in _service_map.items(): await self.start_service(...)``), and each
``start_service`` waits until that service answers on its URL; the hub adds its own route to the proxy
only after the last one. The workbench has about six managed services (Dask Gateway, its dashboard guard,
quota, sessions, rosters, jobs), each a Python process that takes seconds to import and listen, so
start-up was their sum. ``WorkbenchHub`` starts them all on the first ``start_service`` call of
``start()`` and hands each call its own service's result, so start-up takes about the slowest one.

Upstream's semantics are kept: ``start()`` still awaits every service in the same order and exits the hub
when a managed one fails (it cannot start, exits, or does not answer within its timeout); before that
exit, the services this class already started are stopped (upstream had started none after the failing
one). Outside ``start()`` (later restarts, health checks) ``start_service`` is upstream's.

``sqlite_wal`` (set by the embedded mode): the hub's SQLite database in WAL mode with ``synchronous=NORMAL``.
JupyterHub commits on nearly every request (activity reports, tokens, spawns); in SQLite's default rollback
journal each commit is two or more fsyncs on the hub's one event loop, which a class start (40 starts, their
servers' activity reports, the disk busy with 40 JupyterLab start-ups) turned into stalls of a second
(benchmarks/README.md, class start). In WAL mode with ``synchronous=NORMAL`` a commit is a ``write()`` and
the WAL is fsynced at checkpoints: a crash of the hub loses nothing committed, a power cut may lose the last
commits (never corrupting the file). Not for a database on a network file system (WAL needs shared memory
on one host), so only the embedded mode, whose state folder is local, turns it on.

``main()`` is what ``hub_config/jupyterhub`` (the embedded hub's launcher) and ``python -m
workbench.hubapp`` run; it takes JupyterHub's command line.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from jupyterhub.app import JupyterHub
from jupyterhub.objects import Server
from jupyterhub.utils import AnyTimeoutError
from sqlalchemy import event
from traitlets import Bool, default

# `python HUB_LAUNCHER -f CONFIG` runs main(); the launcher is named `jupyterhub` so the hub reads as before in ps
HUB_LAUNCHER = Path(__file__).resolve().parent / "hub_config" / "jupyterhub"


def _sqlite_wal(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # kept in the file; readers do not wait for the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # per connection: the WAL is fsynced at checkpoints, not per commit
    cur.close()


class WorkbenchHub(JupyterHub):
    """JupyterHub whose start-up starts every managed service concurrently (see the module docstring)."""

    _starting_up = False
    _service_starts: dict[str, asyncio.Task] | None = None

    sqlite_wal = Bool(
        False,
        help="Run an sqlite:/// hub database in WAL mode with synchronous=NORMAL (a commit without an fsync; "
        "see the module docstring). Local file systems only.",
    ).tag(config=True)

    def init_db(self):
        super().init_db()
        if self.sqlite_wal and self.db_url.startswith("sqlite:///"):
            engine = self.session_factory.kw["bind"]
            event.listen(engine, "connect", _sqlite_wal)
            engine.dispose()  # the pooled connections from upstream's checks reconnect with it
            self.log.info("Hub database %s: SQLite WAL, synchronous=NORMAL", self.db_url)

    # upstream's logger name, not the subclass's (traitlets names the logger after the class): operators' log
    # filters and the tests that read the hub's access log expect "JupyterHub" in every line
    @default("log")
    def _log_default(self):
        log = logging.getLogger(JupyterHub.__name__)
        log.propagate = False
        return log

    def get_default_logging_config(self) -> dict:
        config = super().get_default_logging_config()
        if type(self).__name__ in config.get("loggers", {}):
            config["loggers"][JupyterHub.__name__] = config["loggers"].pop(type(self).__name__)
        return config

    async def start(self):
        self._starting_up = True
        try:
            await super().start()
        finally:
            self._starting_up = False
            self._service_starts = None

    async def start_service(self, service_name, service, ssl_context=None) -> bool:
        if not self._starting_up:
            return await super().start_service(service_name, service, ssl_context)
        if self._service_starts is None:
            self._service_starts = {
                name: asyncio.ensure_future(self._start_one(name, svc, ssl_context))
                for name, svc in self._service_map.items()
            }
            self.log.info(
                "Starting %d services at once: %s", len(self._service_starts), ", ".join(self._service_starts)
            )
        task = self._service_starts.pop(service_name, None)
        if task is None:  # not in the map when start-up began: upstream's way
            return await super().start_service(service_name, service, ssl_context)
        ready = await task
        if not ready and service.managed:
            await self._stop_started_services()
        return ready

    async def _start_one(self, name, service, ssl_context) -> bool:
        """Upstream's start_service, but a managed service's port is awaited with a 0.1 s connect poll before
        the HTTP check. Upstream's ``wait_up`` backs off to random waits of up to 5 s between checks, which added
        ≈ 2.5 s to a start-up whose six services all listened within 1.6 s (benchmarks/README.md). Same outcomes
        and log lines as upstream: False when the service cannot start, exits, or does not answer in its timeout."""
        if not (service.managed and service.url):
            return await JupyterHub.start_service(self, name, service, ssl_context)
        self.log.info("Starting managed service %s at %s", name, service.url)
        try:
            await service.start()
        except Exception:
            self.log.critical("Failed to start service %s", name, exc_info=True)
            return False
        server = Server.from_orm(service.orm.server)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + service.timeout
        exited = asyncio.ensure_future(self._exit_status(service))  # as upstream: a service that exits fails at once
        try:
            return await self._wait_answering(name, service, server, deadline, exited, ssl_context)
        finally:
            exited.cancel()

    async def _wait_answering(self, name, service, server, deadline, exited, ssl_context) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(server.connect_ip or server.ip or "127.0.0.1", server.port), 5
                )
                writer.close()
                break
            except OSError:
                pass
            if exited.done():
                self.log.critical("Service %s exited with status %s", name, exited.result())
                return False
            if loop.time() > deadline:
                self.log.critical("Cannot connect to %s service %s", name, service.kind)
                return False
            await asyncio.sleep(0.1)
        # the port listens: upstream's HTTP check (with TLS where internal_ssl is on), answered at once unless the
        # service waits for another (the gateway's guard answers 502 until dask-gateway-server listens)
        up = asyncio.ensure_future(
            server.wait_up(http=True, timeout=max(1.0, deadline - loop.time()), ssl_context=ssl_context)
        )
        await asyncio.wait({up, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not up.done():
            up.cancel()
            self.log.critical("Service %s exited with status %s", name, exited.result())
            return False
        try:
            up.result()
        except AnyTimeoutError:
            self.log.critical("Cannot connect to %s service %s", name, service.kind)
            return False
        return True

    @staticmethod
    async def _exit_status(service) -> int:
        while (status := await service.spawner.poll()) is None:
            await asyncio.sleep(1)
        return status

    async def _stop_started_services(self) -> None:
        """Before the hub exits for a failed managed service: cancel the other starts, stop what started."""
        pending = list((self._service_starts or {}).values())
        self._service_starts = {}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for name, service in self._service_map.items():
            if service.managed and service.spawner is not None:
                try:
                    await service.stop()
                except Exception:  # noqa: BLE001 - best effort: the hub exits next anyway
                    self.log.warning("Could not stop service %s", name, exc_info=True)


main = WorkbenchHub.launch_instance

if __name__ == "__main__":
    main()
