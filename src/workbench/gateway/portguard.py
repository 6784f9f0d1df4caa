"""The port guard: a local Dask cluster's loopback ports answer only its owner's processes and the gateway.

Local schedulers and workers listen on 127.0.0.1 (comm, dashboard, the gateway's API on the scheduler,
the workers' nanny, comm and dashboard ports). The comm ports need the cluster's TLS client certificate;
the HTTP ports do not, so without this any local account could read another user's dashboard. The guard
keeps one nftables table per gateway with an ``output`` hook chain that rejects (TCP reset, so the
client sees "connection refused") a connection to a guarded endpoint (the address and port a cluster's
process listens on; a wildcard address stands for every local one) unless the connecting socket's owner
(``meta skuid``) is the cluster's owner or the gateway's account.

This module owns:

- the pure part: :func:`render_ruleset` (guards → nft script, applied atomically by ``nft -f``),
  :func:`table_name`, and the ``/proc`` readers :func:`listening_endpoints` and :func:`process_tree`
  (where a cluster's processes listen, given their pids);
- the edge: :class:`NftPortGuard`, the only code that runs ``nft``; it says once, clearly, when it
  cannot work (not root, ``nft`` missing or refused), and the cluster then runs without the guard.

The backend glue (which clusters, which pids, when to sync) is in :mod:`workbench.gateway.local`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class Guard:
    """The listening endpoints (address, port) of one cluster and the uids that may connect to them.

    An address is the one the socket is bound to (``127.0.0.1``, ``::1``) or a wildcard (``0.0.0.0``, ``::``),
    which stands for every local address of that family. Rules name the address, not just the port: a port
    number alone would let a user who listens on ``127.0.0.2:P`` or ``[::1]:P`` shut everyone else out of
    someone else's ``127.0.0.1:P`` (the hub's API, another user's server).
    """

    endpoints: frozenset[tuple[str, int]]
    uids: frozenset[int]

    @property
    def ports(self) -> list[int]:
        return sorted({p for _, p in self.endpoints})


def table_name(seed: str) -> str:
    """One table per gateway (derived from its database URL), so two workbenches on one machine (the
    test suite runs several) never flush each other's rules."""
    return "wb-gw-" + hashlib.sha256(seed.encode()).hexdigest()[:10]


#: set name -> its nft type, and the rules using them; w4/w6 hold the ports of wildcard listeners
_SETS = {
    "g4": "typeof ip daddr . tcp dport",
    "a4": "typeof ip daddr . tcp dport . meta skuid",
    "g6": "typeof ip6 daddr . tcp dport",
    "a6": "typeof ip6 daddr . tcp dport . meta skuid",
    "w4": "typeof tcp dport",
    "aw4": "typeof tcp dport . meta skuid",
    "w6": "typeof tcp dport",
    "aw6": "typeof tcp dport . meta skuid",
}
_REJECT = "counter reject with tcp reset"
_RULES = [
    f"ip daddr . tcp dport @g4 ip daddr . tcp dport . meta skuid != @a4 {_REJECT}",
    f"ip6 daddr . tcp dport @g6 ip6 daddr . tcp dport . meta skuid != @a6 {_REJECT}",
    f"meta nfproto ipv4 fib daddr type local tcp dport @w4 tcp dport . meta skuid != @aw4 {_REJECT}",
    f"meta nfproto ipv6 fib daddr type local tcp dport @w6 tcp dport . meta skuid != @aw6 {_REJECT}",
]


def _elements(guards: Mapping[str, Guard]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {name: set() for name in _SETS}
    seen: set[tuple[str, int]] = set()
    for name, guard in sorted(guards.items()):
        if not guard.uids:
            raise ValueError(f"cluster {name}: no uid may connect; give at least the gateway's")
        for uid in guard.uids:
            if not 0 <= uid < 2**32:
                raise ValueError(f"cluster {name}: uid {uid} is not a uid")
        for address, port in sorted(guard.endpoints):
            if not 0 < port < 65536:
                raise ValueError(f"cluster {name}: port {port} is not a TCP port")
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"cluster {name}: {address!r} is not an IP address") from None
            if (str(ip), port) in seen:
                raise ValueError(f"cluster {name}: {ip} port {port} is guarded for another cluster too")
            seen.add((str(ip), port))
            fam = "4" if ip.version == 4 else "6"
            if ip.is_unspecified:
                out[f"w{fam}"].add(str(port))
                out[f"aw{fam}"] |= {f"{port} . {uid}" for uid in guard.uids}
            else:
                out[f"g{fam}"].add(f"{ip} . {port}")
                out[f"a{fam}"] |= {f"{ip} . {port} . {uid}" for uid in guard.uids}
    return out


def _sort_key(element: str) -> list:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in element.split(" . ")]


def render_ruleset(table: str, guards: Mapping[str, Guard]) -> str:
    """The nft script that replaces ``table`` with one guarding exactly ``guards`` (pure).

    Creating, deleting and re-creating the table in one script is one nft transaction: there is
    no moment without rules for the endpoints that stay guarded.
    """
    if not _NAME.match(table):
        raise ValueError(f"port guard table name {table!r}: use letters, digits, '-' and '_'")
    elements = _elements(guards)
    lines = [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{"]
    lines += [f"  set {name} {{ {kind}; }}" for name, kind in _SETS.items()]
    lines += ["  chain output {", "    type filter hook output priority filter; policy accept;"]
    lines += [f"    {rule}" for rule in _RULES]
    lines += ["  }", "}"]
    for name in _SETS:
        if elements[name]:
            listed = ", ".join(sorted(elements[name], key=_sort_key))
            lines.append(f"add element inet {table} {name} {{ {listed} }}")
    return "\n".join(lines) + "\n"


def render_delete(table: str) -> str:
    """The nft script that removes ``table`` whether or not it exists (pure)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def _children(proc: Path) -> dict[int, list[int]]:
    """pid -> its children's pids, from every ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pids: Iterable[int], proc: Path = Path("/proc"), children: dict | None = None) -> set[int]:
    """``pids`` and all their descendants that are alive (a nanny forks its worker)."""
    children = _children(proc) if children is None else children
    out: set[int] = set()
    todo = [p for p in pids if (proc / str(p)).is_dir()]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


@dataclass(frozen=True)
class ProcSnapshot:
    """One pass over ``/proc`` (process tree, listening sockets), shared by every cluster of one sync."""

    proc: Path
    children: dict[int, list[int]]
    inodes: dict[int, tuple[str, int]]

    @classmethod
    def take(cls, proc: Path = Path("/proc")) -> ProcSnapshot:
        return cls(proc, _children(proc), _listening_inodes(proc))


def _uid_of(pid: int, proc: Path) -> int | None:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_proc_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (``/proc/net/tcp``: 32-bit words in host order, here little-endian) -> ("127.0.0.1",
    8080); the same for the 32 hex digits of ``/proc/net/tcp6`` (pure)."""
    hexaddr, _, hexport = text.partition(":")
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(hexport, 16)


def _listening_inodes(proc: Path) -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket (IPv4 and IPv6) in this network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            rows = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == _LISTEN:
                out[int(f[9])] = parse_proc_address(f[1])
    return out


def listening_endpoints(
    pids: Iterable[int], uid: int, proc: Path = Path("/proc"), snapshot: ProcSnapshot | None = None
) -> set[tuple[str, int]]:
    """The (address, port) that processes among ``pids`` (and their descendants) running as ``uid`` listen on.

    Only processes of ``uid`` count: a pid the gateway remembers may have been reused by someone else.
    Read from ``/proc`` (kernel-made, nothing a user can redirect).
    """
    snap = snapshot or ProcSnapshot.take(proc)
    proc = snap.proc
    inodes = snap.inodes
    endpoints = set()
    for pid in process_tree(pids, proc, snap.children):
        if _uid_of(pid, proc) != uid:
            continue
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                endpoint = inodes.get(int(target[8:-1]))
                if endpoint is not None:
                    endpoints.add(endpoint)
    return endpoints


class NftPortGuard:
    """Applies guards with ``nft`` (root only). ``enabled`` is False, with one warning logged, when it cannot."""

    def __init__(self, table: str, log: logging.Logger, nft: str = "nft"):
        self.table = table
        self.log = log
        self.nft = shutil.which(nft) or shutil.which(nft, path="/usr/sbin:/sbin")  # root's PATH may lack sbin
        self.enabled = False
        self._applied: dict[str, Guard] | None = None
        self._lock = asyncio.Lock()

    def _off(self, why: str) -> None:
        self.log.warning(
            "Port guard off: %s. Dask dashboards and worker ports on 127.0.0.1 answer every local account "
            "(the scheduler's comm port still needs the cluster's TLS certificate); see docs/security.md",
            why,
        )

    async def _run(self, script: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            self.nft,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate(script.encode())
        return proc.returncode, out.decode(errors="replace").strip()

    async def start(self) -> bool:
        """Replace any table a previous run of this gateway left with an empty one."""
        if os.geteuid() != 0:
            self._off("the gateway does not run as root (all clusters run as its own account anyway)")
            return False
        if self.nft is None:
            self._off("'nft' not found (install Debian's nftables: apt-get install nftables)")
            return False
        rc, out = await self._run(render_ruleset(self.table, {}))
        if rc != 0:
            self._off(f"nft refused the table ({out})")
            return False
        self.enabled = True
        self._applied = {}
        self.log.info("Port guard on: nftables table inet %s (stale rules of an earlier run flushed)", self.table)
        return True

    async def sync(self, guards: Mapping[str, Guard]) -> None:
        """Make the table guard exactly ``guards`` (nothing is run when nothing changed)."""
        if not self.enabled:
            return
        async with self._lock:
            guards = {k: v for k, v in guards.items() if v.endpoints}
            if guards == self._applied:
                return
            try:
                script = render_ruleset(self.table, guards)
            except ValueError as e:
                self.log.error("Port guard: %s; keeping the previous rules", e)
                return
            rc, out = await self._run(script)
            if rc != 0:
                self.log.error("Port guard: nft refused the rules (%s); keeping the previous ones", out)
                return
            for name in sorted(set(guards) | set(self._applied or {})):
                new, old = guards.get(name), (self._applied or {}).get(name)
                if new != old:
                    self.log.info(
                        "Port guard: cluster %s ports %s answer only uids %s",
                        name,
                        new.ports if new else [],
                        sorted(new.uids) if new else [],
                    )
            self._applied = dict(guards)

    async def stop(self) -> None:
        if self.enabled:
            async with self._lock:
                await self._run(render_delete(self.table))
                self.enabled = False
                self.log.info("Port guard: table inet %s removed", self.table)
