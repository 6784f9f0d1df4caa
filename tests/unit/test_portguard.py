"""The port guard (workbench.gateway.portguard): the pure nft script builder against literal text, the /proc
readers against real sockets of this test, and (as root with nft) the real rules against a real listener."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from workbench.gateway.portguard import (
    Guard,
    NftPortGuard,
    ProcSnapshot,
    listening_endpoints,
    parse_proc_address,
    process_tree,
    render_delete,
    render_ruleset,
    table_name,
)

ROOT_AND_NFT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft (Debian's nftables)"
)

EXPECTED_TABLE = """table inet wb-gw-test {}
delete table inet wb-gw-test
table inet wb-gw-test {
  set g4 { typeof ip daddr . tcp dport; }
  set a4 { typeof ip daddr . tcp dport . meta skuid; }
  set g6 { typeof ip6 daddr . tcp dport; }
  set a6 { typeof ip6 daddr . tcp dport . meta skuid; }
  set w4 { typeof tcp dport; }
  set aw4 { typeof tcp dport . meta skuid; }
  set w6 { typeof tcp dport; }
  set aw6 { typeof tcp dport . meta skuid; }
  chain output {
    type filter hook output priority filter; policy accept;
    ip daddr . tcp dport @g4 ip daddr . tcp dport . meta skuid != @a4 counter reject with tcp reset
    ip6 daddr . tcp dport @g6 ip6 daddr . tcp dport . meta skuid != @a6 counter reject with tcp reset
    meta nfproto ipv4 fib daddr type local tcp dport @w4 tcp dport . meta skuid != @aw4 counter reject with tcp reset
    meta nfproto ipv6 fib daddr type local tcp dport @w6 tcp dport . meta skuid != @aw6 counter reject with tcp reset
  }
}
"""


def E(*endpoints):  # noqa: N802 - reads like a literal
    return frozenset(endpoints)


def test_ruleset_guards_each_endpoint_for_its_owner_and_the_gateway():
    script = render_ruleset(
        "wb-gw-test",
        {
            "c1": Guard(E(("127.0.0.1", 40001), ("127.0.0.1", 40002)), frozenset({1001, 0})),
            "c2": Guard(E(("::1", 40100), ("0.0.0.0", 40200), ("::", 40300)), frozenset({1002, 0})),
        },
    )
    assert script == EXPECTED_TABLE + (
        "add element inet wb-gw-test g4 { 127.0.0.1 . 40001, 127.0.0.1 . 40002 }\n"
        "add element inet wb-gw-test a4 { 127.0.0.1 . 40001 . 0, 127.0.0.1 . 40001 . 1001,"
        " 127.0.0.1 . 40002 . 0, 127.0.0.1 . 40002 . 1001 }\n"
        "add element inet wb-gw-test g6 { ::1 . 40100 }\n"
        "add element inet wb-gw-test a6 { ::1 . 40100 . 0, ::1 . 40100 . 1002 }\n"
        "add element inet wb-gw-test w4 { 40200 }\n"
        "add element inet wb-gw-test aw4 { 40200 . 0, 40200 . 1002 }\n"
        "add element inet wb-gw-test w6 { 40300 }\n"
        "add element inet wb-gw-test aw6 { 40300 . 0, 40300 . 1002 }\n"
    )


def test_empty_ruleset_is_the_bare_table_and_delete_tolerates_a_missing_table():
    assert render_ruleset("wb-gw-test", {}) == EXPECTED_TABLE
    assert render_ruleset("wb-gw-test", {"c": Guard(E(), frozenset({0}))}) == EXPECTED_TABLE
    assert render_delete("wb-gw-test") == "table inet wb-gw-test {}\ndelete table inet wb-gw-test\n"


@pytest.mark.parametrize(
    ("table", "guards", "message"),
    [
        ("bad name;", {}, "port guard table name 'bad name;': use letters, digits"),
        ("t", {"c": Guard(E(("127.0.0.1", 0)), frozenset({0}))}, "cluster c: port 0 is not a TCP port"),
        ("t", {"c": Guard(E(("127.0.0.1", 70000)), frozenset({0}))}, "cluster c: port 70000 is not a TCP port"),
        ("t", {"c": Guard(E(("localhost", 5)), frozenset({0}))}, "cluster c: 'localhost' is not an IP address"),
        ("t", {"c": Guard(E(("127.0.0.1", 5)), frozenset({-1}))}, "cluster c: uid -1 is not a uid"),
        ("t", {"c": Guard(E(("127.0.0.1", 5)), frozenset())}, "cluster c: no uid may connect"),
        (
            "t",
            {"a": Guard(E(("127.0.0.1", 5)), frozenset({0})), "b": Guard(E(("127.0.0.1", 5)), frozenset({1}))},
            "cluster b: 127.0.0.1 port 5 is guarded for another cluster too",
        ),
    ],
)
def test_ruleset_refuses_what_nft_would_misread(table, guards, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        render_ruleset(table, guards)


def test_proc_addresses():
    assert parse_proc_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert parse_proc_address("00000000:0016") == ("0.0.0.0", 22)
    assert parse_proc_address("00000000000000000000000001000000:1F90") == ("::1", 8080)
    assert parse_proc_address("00000000000000000000000000000000:0050") == ("::", 80)


def test_table_name_is_stable_per_gateway_and_a_valid_nft_name():
    a, b = table_name("sqlite:////srv/a/dask-gateway.sqlite"), table_name("sqlite:////srv/b/dask-gateway.sqlite")
    assert a == table_name("sqlite:////srv/a/dask-gateway.sqlite") and a != b
    assert render_ruleset(a, {}).startswith(f"table inet {a} {{}}")


@ROOT_AND_NFT
def test_nft_accepts_the_script():
    guard = Guard(E(("127.0.0.1", 40001), ("::1", 40001), ("0.0.0.0", 40002), ("::", 40003)), frozenset({0, 65534}))
    script = render_ruleset("wb-gw-check", {"c": guard})
    r = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


_CHILD_LISTENS = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


def test_listening_ports_finds_the_sockets_of_a_process_and_its_children_of_that_uid_only():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connected = socket.create_connection(listener.getsockname())  # not listening: not counted
    # a parent that forks a listening child, like a nanny and its worker
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_CHILD_LISTENS!r}])"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child_port = int(parent.stdout.readline())
        own = listening_endpoints([os.getpid()], os.getuid())
        assert ("127.0.0.1", listener.getsockname()[1]) in own
        assert not any(port == connected.getsockname()[1] for _, port in own)
        assert listening_endpoints([parent.pid], os.getuid()) == {("127.0.0.1", child_port)}
        snapshot = ProcSnapshot.take()  # one pass over /proc, shared by the clusters of one sync
        assert listening_endpoints([parent.pid], os.getuid(), snapshot=snapshot) == {("127.0.0.1", child_port)}
        assert ("127.0.0.1", listener.getsockname()[1]) in listening_endpoints(
            [os.getpid()], os.getuid(), snapshot=snapshot
        )
        assert len(process_tree([parent.pid])) == 2
        assert listening_endpoints([parent.pid, os.getpid()], os.getuid() + 1) == set()  # another uid's: nothing
        assert listening_endpoints([2**22 + 12345], os.getuid()) == set()  # a pid that is gone
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the parent and its listening child
        parent.wait()
        parent.stdout.close()
        for s in (listener, connected):
            s.close()


def test_without_nft_the_guard_says_so_once_and_stays_off(caplog):
    guard = NftPortGuard("wb-gw-test", logging.getLogger("portguard-test"), nft="nft-not-installed-here")
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(guard.start()) is False
        asyncio.run(guard.sync({"c": Guard(E(("127.0.0.1", 5)), frozenset({0}))}))
    assert not guard.enabled
    [record] = caplog.records
    if os.geteuid() == 0:
        assert "Port guard off: 'nft' not found (install Debian's nftables" in record.getMessage()
    else:
        assert "Port guard off: the gateway does not run as root" in record.getMessage()
    assert "answer every local account" in record.getMessage()


_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close(); print("connected")
except OSError as e:
    print("refused" if isinstance(e, ConnectionRefusedError) else repr(e))
"""


def _connect_as(user: str | None, address: str, port: int) -> str:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(
        [*prefix, "/usr/bin/python3", "-c", _CONNECT, address, str(port)], capture_output=True, text=True, timeout=30
    ).stdout.strip()


def _listen(address: str, port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind((address, port))
    s.listen(8)
    return s


def _listen_pair() -> tuple[socket.socket, socket.socket]:
    """A listener on 127.0.0.2 at a free port and one on 127.0.0.1 at the same port; a port another process holds
    on 127.0.0.1 (the live tests run beside these) is given up and another one tried."""
    for _ in range(50):
        guarded = _listen("127.0.0.2")
        try:
            return guarded, _listen("127.0.0.1", guarded.getsockname()[1])
        except OSError as e:
            guarded.close()
            if e.errno != errno.EADDRINUSE:
                raise
    raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2 in 50 tries")


@ROOT_AND_NFT
def test_real_rules_refuse_other_uids_and_go_with_stop():
    """Real nft rules (a table of this test's own) in front of real listeners owned by root: the guarded one
    refuses `nobody`; a listener of someone else on the same port at another loopback address is untouched
    (a user cannot shut others out of a port by listening on it at 127.0.0.2)."""
    table = table_name(f"unit-test-{os.getpid()}")
    guard = NftPortGuard(table, logging.getLogger("portguard-test"))
    guarded, neighbour = _listen_pair()
    port = guarded.getsockname()[1]

    async def scenario():
        assert await guard.start()
        await guard.sync({"c": Guard(E(("127.0.0.2", port)), frozenset({0}))})
        listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
        assert f"elements = {{ 127.0.0.2 . {port} }}" in listed
        assert _connect_as("nobody", "127.0.0.2", port) == "refused"
        assert _connect_as(None, "127.0.0.2", port) == "connected"
        assert _connect_as("nobody", "127.0.0.1", port) == "connected"  # the neighbour's socket
        await guard.sync({"c": Guard(E(("0.0.0.0", port)), frozenset({0}))})  # a wildcard: every local address
        assert _connect_as("nobody", "127.0.0.1", port) == "refused"
        await guard.sync({})
        assert _connect_as("nobody", "127.0.0.2", port) == "connected"
        await guard.stop()

    try:
        asyncio.run(scenario())
        r = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True)
        assert r.returncode != 0  # the table is gone
    finally:
        guarded.close()
        neighbour.close()
        subprocess.run(["nft", "-f", "-"], input=render_delete(table), text=True, capture_output=True)
