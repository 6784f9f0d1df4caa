"""The port guard (workbench.gateway.portguard): the pure nft script builder against literal text, the /proc
readers against real sockets of this test, and (as root with nft) the real rules against a real listener."""

from __future__ import annotations

import asyncio
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
    listening_ports,
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
  set guarded { type inet_service; }
  set allowed { typeof tcp dport . meta skuid; }
  chain output {
    type filter hook output priority filter; policy accept;
    meta l4proto tcp fib daddr type local tcp dport @guarded tcp dport . meta skuid != @allowed counter reject with tcp reset
  }
}
"""


def test_ruleset_guards_each_port_for_its_owner_and_the_gateway():
    script = render_ruleset(
        "wb-gw-test",
        {
            "c1": Guard(frozenset({40001, 40002}), frozenset({1001, 0})),
            "c2": Guard(frozenset({40100}), frozenset({1002, 0})),
        },
    )
    assert script == EXPECTED_TABLE + (
        "add element inet wb-gw-test guarded { 40001, 40002, 40100 }\n"
        "add element inet wb-gw-test allowed { 40001 . 0, 40001 . 1001, 40002 . 0, 40002 . 1001,"
        " 40100 . 0, 40100 . 1002 }\n"
    )


def test_empty_ruleset_is_the_bare_table_and_delete_tolerates_a_missing_table():
    assert render_ruleset("wb-gw-test", {}) == EXPECTED_TABLE
    assert render_delete("wb-gw-test") == "table inet wb-gw-test {}\ndelete table inet wb-gw-test\n"


@pytest.mark.parametrize(
    ("table", "guards", "message"),
    [
        ("bad name;", {}, "port guard table name 'bad name;': use letters, digits"),
        ("t", {"c": Guard(frozenset({0}), frozenset({0}))}, "cluster c: port 0 is not a TCP port"),
        ("t", {"c": Guard(frozenset({70000}), frozenset({0}))}, "cluster c: port 70000 is not a TCP port"),
        ("t", {"c": Guard(frozenset({5}), frozenset({-1}))}, "cluster c: uid -1 is not a uid"),
        ("t", {"c": Guard(frozenset({5}), frozenset())}, "cluster c: no uid may connect"),
        (
            "t",
            {"a": Guard(frozenset({5}), frozenset({0})), "b": Guard(frozenset({5}), frozenset({1}))},
            "cluster b: port 5 is guarded for another cluster too",
        ),
    ],
)
def test_ruleset_refuses_what_nft_would_misread(table, guards, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        render_ruleset(table, guards)


def test_table_name_is_stable_per_gateway_and_a_valid_nft_name():
    a, b = table_name("sqlite:////srv/a/dask-gateway.sqlite"), table_name("sqlite:////srv/b/dask-gateway.sqlite")
    assert a == table_name("sqlite:////srv/a/dask-gateway.sqlite") and a != b
    assert render_ruleset(a, {}).startswith(f"table inet {a} {{}}")


@ROOT_AND_NFT
def test_nft_accepts_the_script():
    script = render_ruleset("wb-gw-check", {"c": Guard(frozenset({40001}), frozenset({0, 65534}))})
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
        own = listening_ports([os.getpid()], os.getuid())
        assert listener.getsockname()[1] in own
        assert connected.getsockname()[1] not in own
        assert child_port in listening_ports([parent.pid], os.getuid())
        assert len(process_tree([parent.pid])) == 2
        assert listening_ports([parent.pid, os.getpid()], os.getuid() + 1) == set()  # another uid's: nothing
        assert listening_ports([2**22 + 12345], os.getuid()) == set()  # a pid that is gone
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
        asyncio.run(guard.sync({"c": Guard(frozenset({5}), frozenset({0}))}))
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
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).close(); print("connected")
except OSError as e:
    print("refused" if isinstance(e, ConnectionRefusedError) else repr(e))
"""


def _connect_as(user: str | None, port: int) -> str:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(
        [*prefix, "/usr/bin/python3", "-c", _CONNECT, str(port)], capture_output=True, text=True, timeout=30
    ).stdout.strip()


@ROOT_AND_NFT
def test_real_rules_refuse_other_uids_and_go_with_stop():
    """Real nft rules (a table of this test's own) in front of a real listener owned by root."""
    table = table_name(f"unit-test-{os.getpid()}")
    guard = NftPortGuard(table, logging.getLogger("portguard-test"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    async def scenario():
        assert await guard.start()
        await guard.sync({"c": Guard(frozenset({port}), frozenset({0}))})
        listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
        assert f"elements = {{ {port} }}" in listed
        assert _connect_as("nobody", port) == "refused"
        assert _connect_as(None, port) == "connected"
        await guard.sync({})
        assert _connect_as("nobody", port) == "connected"
        await guard.stop()

    try:
        asyncio.run(scenario())
        r = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True)
        assert r.returncode != 0  # the table is gone
    finally:
        listener.close()
        subprocess.run(["nft", "-f", "-"], input=render_delete(table), text=True, capture_output=True)
