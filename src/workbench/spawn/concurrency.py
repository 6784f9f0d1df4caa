"""Start slots: how many single-user servers may be *starting* at once on one machine, a FIFO queue for the rest,
and the queue position as the spawner's progress events (:class:`StartSlotMixin`, for every spawner).

Why: 40 JupyterLab start-ups sharing 2 cores all run past the hub's ``http_timeout`` together (issue 12, target 2).
JupyterHub's ``concurrent_spawn_limit`` answers 429 to the excess; here the excess waits in line and sees
"waiting for a start slot: N ahead of you" on the spawn page.

A slot is held from the start until the server answers HTTP (the CPU-heavy part is the server's own start-up,
after ``Spawner.start()`` has returned), and our own timer (:attr:`StartSlotMixin.slot_start_timeout`) starts
when the slot is granted. The hub times the whole ``start()`` with ``Spawner.start_timeout``, queue included, so
the hub's ``start_timeout`` must cover :attr:`~StartSlotMixin.start_queue_timeout` + ``slot_start_timeout``
(:func:`hub_start_timeout`); when ``start()`` returns the server already answers, so ``http_timeout`` is not
reached.

Order with the admission mixins (:class:`~workbench.spawn.common.AdmittedOptionsMixin`,
:class:`~workbench.spawn.common.QuotaAdmissionMixin`): a start is **admitted first, then waits for its slot**. The
engine's own ``start()`` (e.g. ``WorkbenchLocalSpawner.start``) checks the profile and asks the quota service,
then calls ``super().start()``, which is this mixin's ``start()``. Why this way round:

- a refusal (unentitled profile 403, no budget or a cap 403, quota service down 503) answers at once, instead of
  after minutes in line for a start that was never going to happen;
- a group's concurrency cap counts the queued starts, so draining the line can never start more servers than
  the cap allows (admitting after the slot would let the whole line pass the check one by one);
- admission takes milliseconds, so it does not hold up the line; the slot is held only for the CPU-heavy part.

The price: the ledger row opens at admission, so time spent in the line (at most ``start_queue_timeout``, in
practice seconds to a few minutes at a class start) is charged as server time, and a start that gives up in the
line closes its row (the engines' failure path sends the stop).

The limit: :attr:`StartSlotMixin.start_slots`, 0 (the default) meaning :func:`machine_capacity`; the embedded hub
takes ``$WORKBENCH_START_SLOTS`` (:func:`start_slots_from_env`) to set it by hand.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from urllib.parse import urlsplit

from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

# what one JupyterLab start-up needs to finish in a few seconds (measured: ≈ 1 core for ≈ 5–8 s, ≈ 250 MB)
CPU_PER_START = 1.0
MEMORY_PER_START = 512 * 2**20


def machine_capacity(cpus: float | None = None, memory: int | None = None) -> int:
    """How many servers may start at once on this machine: one per core the hub may use and per 512 MiB of
    available memory, at least 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory is None:
        memory = _available_memory()
    return max(1, min(int(cpus // CPU_PER_START), int(memory // MEMORY_PER_START)))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class StartSlots:
    """At most ``limit`` holders at once; the others wait first come, first served and can ask their place."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"start slots: the limit must be at least 1, not {limit}")
        self.limit = limit
        self.running = 0
        self.peak = 0  # the most holders seen at once (tests and the log read it)
        self.granted = 0
        self._waiting: deque[asyncio.Future] = deque()
        self._changed: asyncio.Future | None = None

    async def wait_for_change(self, timeout: float) -> None:
        """Return when the line moves (a slot granted, someone left) or after ``timeout`` seconds."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
        except TimeoutError:
            pass

    def _moved(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def ahead_of(self, ticket: asyncio.Future) -> int | None:
        """How many wait before ``ticket``; None once it holds a slot (or left the line)."""
        try:
            return self._waiting.index(ticket)
        except ValueError:
            return None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def ticket(self) -> asyncio.Future:
        """Join the line; the ticket is done when its slot is granted (then :meth:`release` must follow)."""
        ticket = asyncio.get_running_loop().create_future()
        if self.running < self.limit and not self._waiting:
            self._grant(ticket)
        else:
            self._waiting.append(ticket)
        return ticket

    async def acquire(self, ticket: asyncio.Future) -> None:
        """Wait for ``ticket``'s slot; on cancellation or timeout the ticket leaves the line (or gives its slot back)."""
        try:
            await asyncio.shield(ticket)
        except BaseException:
            self.leave(ticket)
            raise

    def leave(self, ticket: asyncio.Future) -> None:
        if ticket.done():
            self.release()
        else:
            self._waiting.remove(ticket)
            ticket.cancel()
            self._moved()

    def release(self) -> None:
        self.running -= 1
        while self._waiting and self.running < self.limit:
            self._grant(self._waiting.popleft())

    def _grant(self, ticket: asyncio.Future) -> None:
        self.running += 1
        self.granted += 1
        self.peak = max(self.peak, self.running)
        ticket.set_result(None)
        self._moved()


START_SLOTS_ENV = "WORKBENCH_START_SLOTS"


class StartSlotsError(ValueError):
    """A start-slot setting an admin got wrong (the message names it and the fix)."""


def start_slots_from_env(environ) -> int | None:
    """``$WORKBENCH_START_SLOTS`` as a number of slots (None when unset; 0: from the machine); raises
    :class:`StartSlotsError` naming the variable and the fix for anything else than a whole number ≥ 0."""
    raw = environ.get(START_SLOTS_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise StartSlotsError(
            f"{START_SLOTS_ENV}={raw!r}: must be a whole number of servers that may start at once (e.g. 4), "
            f"or 0 to follow the machine (now {machine_capacity()}: one per core and per 512 MiB available); "
            f"fix or unset it"
        )
    return value


_SLOTS: dict[int, StartSlots] = {}


def shared_slots(limit: int) -> StartSlots:
    """The hub process's start slots (one line for every spawner of the process)."""
    if not _SLOTS:
        _SLOTS[0] = StartSlots(limit)
    return _SLOTS[0]


def hub_start_timeout(start_queue_timeout: float, slot_start_timeout: float) -> float:
    """The ``Spawner.start_timeout`` the hub needs so that a queued start is timed by us, not killed by the hub."""
    return start_queue_timeout + slot_start_timeout + 30


class StartSlotMixin(LoggingConfigurable):
    """Spawner mixin: ``start()`` waits for a start slot, then starts and waits until the server answers HTTP.

    Put it first in the bases (``class S(StartSlotMixin, AdmittedOptionsMixin, QuotaAdmissionMixin, ...,
    LocalProcessSpawner)``) and let the engine's own ``start()`` admit the start before it calls ``super().start()``
    (admission first, then the slot: see the module's docstring for why). Needs the spawner's ``server`` (its URL
    path) and ``start()`` returning ``(ip, port)`` or a URL, as JupyterHub's spawners do.
    """

    start_slots = Integer(
        0,
        help="How many servers of this hub may start at once (until they answer HTTP); the others wait in line and "
        "see their place on the spawn page. 0: from the machine (one per core and per 512 MiB available memory).",
    ).tag(config=True)
    start_queue_timeout = Float(
        3600.0,
        help="Seconds a start may wait for its slot before it fails with a message saying so. The line always "
        "moves (each holder answers or fails within slot_start_timeout), so this only caps a very long line.",
    ).tag(config=True)
    slot_start_timeout = Float(
        120.0,
        help="Seconds from the slot being granted until the server must answer HTTP (the hub's own start_timeout "
        "and http_timeout count the queue too; set Spawner.start_timeout to hub_start_timeout(...)).",
    ).tag(config=True)

    _slot_ticket: asyncio.Future | None = None

    @property
    def slots(self) -> StartSlots:
        return shared_slots(self.start_slots or machine_capacity())

    async def start(self):
        slots = self.slots
        self._slot_ticket = ticket = slots.ticket()
        ahead = slots.ahead_of(ticket)
        if ahead is not None:
            self.log.info("Start of %s waits for a start slot: %d ahead", self._log_name, ahead)
        try:
            await asyncio.wait_for(slots.acquire(ticket), self.start_queue_timeout)
        except TimeoutError:
            raise TimeoutError(
                f"No start slot became free in {self.start_queue_timeout:g} s (too many servers starting at once); "
                "try again in a few minutes."
            ) from None
        self.log.info(
            "Start slot granted to %s (%d starting of %d, %d waiting, peak %d)",
            self._log_name,
            slots.running,
            slots.limit,
            slots.waiting,
            slots.peak,
        )
        try:
            return await asyncio.wait_for(self._start_until_up(), self.slot_start_timeout)
        except TimeoutError:
            raise TimeoutError(
                f"The server did not answer within {self.slot_start_timeout:g} s of its start (Spawner."
                "slot_start_timeout)."
            ) from None
        finally:
            slots.release()
            self._slot_ticket = None  # the next start of this spawner takes a new ticket

    async def _start_until_up(self):
        url = await super().start()
        target = f"http://{url[0]}:{url[1]}" if isinstance(url, tuple) else url
        await self._wait_answering(target.rstrip("/") + self.server.base_url)
        return url

    async def _wait_answering(self, url: str) -> None:
        """Until the server answers HTTP at ``url``.

        A TCP connect every 0.1 s while nothing listens (refused at once, cheap), then one HTTP check. JupyterHub's
        ``wait_for_http_server`` alone backs off to random waits of up to 5 s, which added 0-5 s (2.2 s measured)
        to every start after the server was already up (issue 12, single start). Every second the process is
        polled: a server that exits frees its slot at once with its status, not after ``slot_start_timeout``.
        """
        from jupyterhub.utils import wait_for_http_server

        parsed = urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or (443 if parsed.scheme == "https" else 80)
        tries = 0
        while True:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            except OSError:
                tries += 1
                if tries % 10 == 0 and (status := await self.poll()) is not None:
                    raise RuntimeError(f"The server exited with status {status} before it answered.") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        await wait_for_http_server(url, timeout=self.slot_start_timeout)

    async def progress(self):
        """Queue position while waiting ("waiting for a start slot: 3 ahead of you"), then upstream's events."""
        last = None
        while True:
            ticket = self._slot_ticket
            if ticket is not None:
                ahead = self.slots.ahead_of(ticket)
                if ahead is None:
                    break
                if ahead != last:
                    last = ahead
                    yield {"progress": 5, "message": f"waiting for a start slot: {ahead} ahead of you"}
            elif not self._spawn_pending:
                return
            await self.slots.wait_for_change(1.0)
        yield {"progress": 30, "message": "start slot granted, starting your server"}
        async for event in super().progress():
            yield event
