"""Isolation at the OS level, attacked through the real embedded workbench (root, real Unix accounts).

Each test plays a user with their own account (``runuser -u wb-<name>``, what a terminal in their
server can do) against the files root touches for them, and checks both the refusal and that nothing
outside the user's own tree was created, chowned or read:

- starter notebooks replaced by symlinks (to a fresh ``/etc`` name and to a root-owned file) before a
  restart: nothing created, the target's owner, mode and content unchanged;
- a Dask cluster's ``logs`` folder replaced by a symlink to a root-owned folder before scaling: the
  worker is refused (it opens its own log as the user) and nothing appears in that folder;
- the state folder (databases, logs, secrets) cannot be listed or read by a user, no file in it is
  readable by others, and the hub log holds no user's server token;
- schedulers and workers run in a cgroup with the cluster's cores and memory, with umask 022, and
  servers too;
- every loopback port of a cluster's scheduler and workers (comm, dashboards, the gateway's API) refuses
  another user's connection (nftables ``meta skuid``, :mod:`workbench.gateway.portguard`) and answers the
  owner's and the gateway's; the rules go when the cluster stops.

Nothing is mocked. Skipped unless run as root (users get Unix accounts only then).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from workbench.sysusers import USER_PREFIX

from .harness import DEMO, Workbench
from .test_embedded import server_process, state_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="per-user Unix accounts need root"),
]

GIB = 2**30


#: demo logins of this module only: the machine's other test runs use the demo names (and so the same
#: Unix accounts) at the same time, and their spawners would act on the links these tests plant
STUDENT, RESEARCHER = "iso-student", "iso-researcher"


@pytest.fixture(scope="module")
def wb():
    state = state_dir()
    policy = yaml.safe_load(DEMO.read_text())
    policy["auth"]["demo_users"] = {STUDENT: {"groups": ["course-ml101"]}, RESEARCHER: {"groups": ["physics-lab"]}}
    config = state.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(policy))
    w = Workbench(state, config=config).start()
    assert w.system_users, w.output()
    yield w
    assert w.stop() == 0, w.output()
    assert not w.leftovers(), w.leftovers()


@pytest.fixture
def victim():
    """A root-owned folder (0755) with a root-owned file, standing for /etc and /etc/shadow."""
    d = Path(tempfile.mkdtemp(prefix="wb-victim-", dir="/tmp"))
    d.chmod(0o755)
    shadow = d / "shadow"
    shadow.write_text("root:$6$secret:19000:0:99999:7:::\n")
    shadow.chmod(0o640)
    yield d
    shutil.rmtree(d)


def as_user(account: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", account, "--", *cmd], capture_output=True, text=True, timeout=60)


def snapshot(path: Path) -> dict[str, tuple]:
    """Owner, mode and content of everything in a folder (not following symlinks)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(p)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), data)
    return out


def token_of(w: Workbench, name: str) -> str:
    return w.new_token(w.login(name), name)


def cgroup_limits(pid: int) -> tuple[int, float]:
    """(memory limit in bytes, CPUs) of the cgroup(s) ``pid`` is in (v1 or v2)."""
    memory = cpus = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup" + path)
            if (base / "memory.max").exists():
                memory = int((base / "memory.max").read_text())
                quota, period = (base / "cpu.max").read_text().split()
                cpus = int(quota) / int(period)
        elif "memory" in controllers.split(","):
            memory = int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        elif "cpu" in controllers.split(","):
            base = Path(f"/sys/fs/cgroup/{controllers}{path}")
            cpus = int((base / "cpu.cfs_quota_us").read_text()) / int((base / "cpu.cfs_period_us").read_text())
    assert memory is not None and cpus is not None, Path(f"/proc/{pid}/cgroup").read_text()
    return memory, cpus


def umask_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return line.split()[1]
    raise AssertionError("no Umask line")


def wait_for(check, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


_PROBE = """
import socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the attacker has no cluster certificate
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"x" * 64)
        print("answered" if tls.recv(64) else "closed")
except ssl.SSLError as e:  # under load the alert may arrive as an EOF (SSLEOFError, no reason)
    print("tls-refused", type(e).__name__, e.reason)
except OSError as e:
    print("no-tls", e)
"""


def scheduler_ports_need_the_cluster_cert(scheduler: psutil.Process, attacker: str) -> bool:
    """Whether some listening port of ``scheduler`` speaks TLS and refuses ``attacker``'s handshake
    without the cluster's client certificate (dask-gateway's per-cluster TLS: the scheduler's comm port).
    Probed from an account the port guard lets through (root, the gateway's), so that it is the TLS layer
    that refuses: it still protects the comm port where the guard is off (no nft, not root). The port guard
    itself is :func:`test_dask_ports_on_loopback_answer_only_the_owner_and_the_gateway`."""
    ports = [c.laddr.port for c in scheduler.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    outcomes = {port: as_user(attacker, "/usr/bin/python3", "-c", _PROBE, str(port)).stdout.strip() for port in ports}
    # a plain HTTP port fails a handshake too (WRONG_VERSION_NUMBER, or a timeout while it waits for a request):
    # only a TLS server ending the handshake of a client without the cluster's certificate counts
    refused = {p: o for p, o in outcomes.items() if o.startswith("tls-refused") and "WRONG_VERSION" not in o}
    print("scheduler ports probed by", attacker, outcomes)
    assert refused, outcomes
    return True


def _drop_planted_links() -> None:
    """Remove the links the starter test plants (as the users), also those an interrupted earlier run left."""
    for account, name in (
        (f"{USER_PREFIX}{STUDENT}", "exercise-1.ipynb"),
        (f"{USER_PREFIX}{RESEARCHER}", "climatology-with-dask.ipynb"),
    ):
        try:
            path = Path(pwd.getpwnam(account).pw_dir) / name
        except KeyError:
            continue
        if path.is_symlink():
            as_user(account, "rm", "-f", str(path))


def test_starters_replaced_by_symlinks_are_not_followed_at_restart(wb, victim):
    _drop_planted_links()
    token = token_of(wb, STUDENT)
    wb.start_server(token, STUDENT)
    wb.stop_server(token, STUDENT)
    home = Path(pwd.getpwnam(f"{USER_PREFIX}{STUDENT}").pw_dir)
    assert (home / "exercise-1.ipynb").is_file()
    etc_name = Path(f"/etc/wb-isolation-{victim.name}")  # a fresh name in the real /etc
    assert not etc_name.exists()
    rtoken = token_of(wb, RESEARCHER)
    try:
        r = as_user(
            f"{USER_PREFIX}{STUDENT}", "sh", "-c", f"rm ~/exercise-1.ipynb && ln -s {etc_name} ~/exercise-1.ipynb"
        )
        assert r.returncode == 0, r.stderr

        wb.start_server(rtoken, RESEARCHER)
        wb.stop_server(rtoken, RESEARCHER)
        before = snapshot(victim)
        r = as_user(
            f"{USER_PREFIX}{RESEARCHER}",
            "sh",
            "-c",
            f"rm ~/climatology-with-dask.ipynb && ln -s {victim}/shadow ~/climatology-with-dask.ipynb",
        )
        assert r.returncode == 0, r.stderr

        wb.start_server(token, STUDENT)  # the spawner (root) installs missing starters again
        wb.start_server(rtoken, RESEARCHER)
        assert not os.path.lexists(etc_name), "root followed the user's symlink into /etc"
        assert snapshot(victim) == before  # owner, mode and content of the root-owned file unchanged
        assert os.readlink(home / "exercise-1.ipynb") == str(etc_name)  # the user's own link, left alone
        # the servers themselves create files with the usual umask, although the hub runs with 077
        assert umask_of(server_process(wb, RESEARCHER).pid) == "0022"
    finally:
        wb.stop_server(token, STUDENT)
        _drop_planted_links()


def test_state_folder_is_private_and_logs_hold_no_user_token(wb):
    token = token_of(wb, RESEARCHER)
    if not wb.token_api(token, "GET", f"/users/{RESEARCHER}").json().get("servers"):
        wb.start_server(token, RESEARCHER)
    server_token = server_process(wb, RESEARCHER).environ()["JUPYTERHUB_API_TOKEN"]
    state = wb.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"jupyterhub.sqlite", "dask-gateway.sqlite", "quota.sqlite", "secrets.json", "hub.log"} <= names, names
    r = as_user(f"{USER_PREFIX}{STUDENT}", "ls", "-a", str(state))
    assert r.returncode != 0 and "Permission denied" in r.stderr and r.stdout == ""
    for p in files:
        r = as_user(f"{USER_PREFIX}{STUDENT}", "cat", str(p))
        assert r.returncode != 0 and r.stdout == "", f"{STUDENT} read {p}"
    found = subprocess.run(["find", str(state), "-perm", "/o=r"], capture_output=True, text=True, check=True)
    assert found.stdout == ""
    assert server_token not in wb.hub_log() + wb.output()


def test_dask_processes_carry_the_cluster_limits_and_never_let_root_follow_the_users_symlinks(wb, victim):
    token = token_of(wb, RESEARCHER)
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(worker_cores=1, worker_memory=1.5)
        try:
            [workdir] = glob.glob(f"/tmp/dask-*-{cluster.name}")
            owner = pwd.getpwnam(f"{USER_PREFIX}{RESEARCHER}")
            st = os.lstat(workdir)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner.pw_uid, 0o700)

            cluster.scale(1)
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=180)
            procs = [
                p
                for p in psutil.process_iter(["username", "cwd", "cmdline"])
                if p.info["username"] == f"{USER_PREFIX}{RESEARCHER}" and p.info["cwd"] == workdir
            ]
            workers = [p for p in procs if "worker" in " ".join(p.info["cmdline"] or [])]
            # the nanny forks its worker (workbench.gateway.fast_start), which keeps the nanny's command line:
            # count the nannies, those whose parent is not a worker process themselves
            nannies = [p for p in workers if p.ppid() not in {w.pid for w in workers}]
            schedulers = [p for p in procs if "scheduler" in " ".join(p.info["cmdline"] or [])]
            assert len(nannies) == 1 and len(schedulers) == 1, [p.info for p in procs]
            assert all(p.ppid() == nannies[0].pid for p in workers if p is not nannies[0]), [p.info for p in workers]
            assert cgroup_limits(workers[0].pid) == (int(1.5 * GIB), 1.0)
            memory, cpus = cgroup_limits(schedulers[0].pid)
            assert cpus == 1.0 and memory > 0
            assert umask_of(workers[0].pid) == "0022"
            assert scheduler_ports_need_the_cluster_cert(schedulers[0], "root")
            logs = sorted(Path(workdir, "logs").iterdir())
            assert logs and all(os.lstat(p).st_uid == owner.pw_uid for p in logs), logs
            client.close()

            # the user points their cluster's logs folder at a root-owned folder, then scales
            before = snapshot(victim)
            r = as_user(
                f"{USER_PREFIX}{RESEARCHER}", "sh", "-c", f"cd {workdir} && mv logs logs.mine && ln -s {victim} logs"
            )
            assert r.returncode == 0, r.stderr
            cluster.scale(2)
            wait_for(lambda: "Failed to submit worker" in wb.hub_log(), "the second worker's refusal in the log")
            assert "Exception occurred in preexec_fn" in wb.hub_log()
            assert snapshot(victim) == before  # nothing created, chowned or written there
        finally:
            cluster.shutdown()
    # the gateway removes the folder (with the user's link in it) once the cluster has stopped
    wait_for(lambda: not glob.glob(f"/tmp/dask-*-{cluster.name}"), "the cluster's folder removed")
    assert snapshot(victim) == before


_HTTP_PROBE = """
import http.client, sys
for port in sys.argv[1:]:
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        c.request("GET", "/health")
        print(port, c.getresponse().status)
    except ConnectionRefusedError:
        print(port, "refused")
    except Exception as e:  # a TLS port answers plain HTTP with a close or an alert
        print(port, type(e).__name__)
"""


def http_probe(account: str, ports) -> dict[int, str]:
    """``GET /health`` on each loopback port, from a process of ``account``: port -> status or outcome."""
    r = as_user(account, "/usr/bin/python3", "-c", _HTTP_PROBE, *map(str, sorted(ports)))
    assert r.returncode == 0, r.stderr
    return {int(port): outcome for port, outcome in (line.split(" ", 1) for line in r.stdout.splitlines())}


def guarded_ports(table: str) -> set[int]:
    """Ports the gateway's nftables table guards on 127.0.0.1: its ``127.0.0.1 . port`` elements (set ``g4``)
    and the ports of wildcard IPv4 listeners (set ``w4``); empty when the table is gone."""
    ports = set()
    for name in ("g4", "w4"):
        out = subprocess.run(["nft", "-j", "list", "set", "inet", table, name], capture_output=True, text=True)
        if out.returncode != 0:
            return set()
        [the_set] = [o["set"] for o in json.loads(out.stdout)["nftables"] if "set" in o]
        for e in the_set.get("elem", []):
            if isinstance(e, int):
                ports.add(e)
            elif e["concat"][0] == "127.0.0.1":
                ports.add(e["concat"][1])
    return ports


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/system-deps.sh installs nftables)")
def test_dask_ports_on_loopback_answer_only_the_owner_and_the_gateway(wb):
    token = token_of(wb, RESEARCHER)
    logs = lambda: (
        wb.hub_log()
        + "".join(  # noqa: E731
            p.read_text(errors="replace") for p in (wb.state_dir / "logs").glob("*.log") if p.name != "hub.log"
        )
    )
    [table] = wait_for(lambda: re.findall(r"Port guard on: nftables table inet (\S+)", logs()), "the port guard on")
    with wb.gateway(token) as gw:
        cluster = gw.new_cluster(worker_cores=1, worker_memory=1)
        try:
            cluster.scale(1)
            client = cluster.get_client()
            client.wait_for_workers(1, timeout=180)
            [workdir] = glob.glob(f"/tmp/dask-*-{cluster.name}")
            procs = [
                p
                for p in psutil.process_iter(["username", "cwd", "cmdline"])
                if p.info["username"] == f"{USER_PREFIX}{RESEARCHER}" and p.info["cwd"] == workdir
            ]
            listening = {
                p.pid: {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
                for p in procs
            }
            scheduler = {port for p in procs if "scheduler" in " ".join(p.info["cmdline"]) for port in listening[p.pid]}
            workers = {port for p in procs if "worker" in " ".join(p.info["cmdline"]) for port in listening[p.pid]}
            assert len(scheduler) >= 3 and len(workers) >= 2, listening  # comm, dashboard, API; nanny, worker
            ports = scheduler | workers
            wait_for(lambda: ports <= guarded_ports(table), f"rules for {sorted(ports)}")

            # another user's process: every port refuses (no HTTP answer, no TLS handshake)
            assert http_probe(f"{USER_PREFIX}{STUDENT}", ports) == dict.fromkeys(ports, "refused")
            # the owner's: the scheduler's dashboard and the worker's answer
            owner = http_probe(f"{USER_PREFIX}{RESEARCHER}", ports)
            assert "refused" not in owner.values(), owner
            assert any(owner[p] == "200" for p in scheduler) and any(owner[p] == "200" for p in workers), owner
            # the gateway's path (root): the proxied dashboard for its owner
            dash = f"{wb.url}/services/dask-gateway/clusters/{cluster.name}/status"
            r = requests.get(dash, headers={"Authorization": f"token {token}"}, timeout=30)
            assert r.status_code == 200 and "Dask" in r.text, (r.status_code, r.text[:300])
            client.close()
        finally:
            cluster.shutdown()
    wait_for(lambda: not (ports & guarded_ports(table)), "the cluster's rules removed")
    assert f"Port guard: cluster {cluster.name} ports []" in logs()
