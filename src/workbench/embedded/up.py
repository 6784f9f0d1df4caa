"""``workbench up``: run the embedded workbench in the foreground.

Order of work: validate the policy (nothing starts if it is broken), refuse demo auth on a
network address, prepare the state folder and secrets, pick ports (the internal ones are remembered in
``<state>/ports.json`` and reused by the next start of the same state folder when free, so servers that
outlive a hub crash, e.g. Slurm jobs, still reach the hub's API: :func:`stable_ports`), then start JupyterHub (which
starts its proxy, the Dask Gateway and the idle culler as managed services) and wait for
``/hub/health``. On Ctrl-C or SIGTERM the hub is asked to stop (it stops servers, services and
the proxy); anything still alive after that is killed, except running notebook jobs (they outlive it and the
next `workbench up` on the same state folder follows them again). This process is a Linux child
subreaper, so processes orphaned by a crashed hub or gateway come back to it and are reaped.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets as pysecrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from workbench.auth.demo import PASSWORD_ENV, DemoAuthExposed, check_demo_exposure
from workbench.gpus import detect_devices, inventory, parse_fake_gpus
from workbench.hubapp import HUB_LAUNCHER
from workbench.names import JOBS_SERVICE, QUOTA_SERVICE
from workbench.origins import SubdomainHostError, check_subdomain_host
from workbench.policy import Policy, PolicyError, load_policy
from workbench.runtime import (
    RUNTIME_ENV,
    SERVICES_UMASK,
    Runtime,
    free_port,
    is_loopback,
    load_or_create_secrets,
    make_private_state_dir,
    port_in_use,
)
from workbench.sysusers import (
    ACCOUNT_PREFIX_ENV,
    ACCOUNT_PREFIX_PROBLEM,
    DEFAULT_ACCOUNT_PREFIX,
    USER_PREFIX,
    others_can_execute,
    system_username,
)

#: the thin config loaders and the demo policy, shipped inside the package (``workbench/hub_config``)
HUB_CONFIG_DIR = Path(__file__).resolve().parents[1] / "hub_config"
DEFAULT_CONFIG = HUB_CONFIG_DIR / "demo.yaml"
PR_SET_CHILD_SUBREAPER = 36


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def say(msg: str) -> None:
    print(f"[workbench] {msg}", flush=True)


def fail(msg: str, code: int = 2) -> int:
    print(f"[workbench] error: {msg}", file=sys.stderr, flush=True)
    return code


@dataclass
class UpOptions:
    config: str = str(DEFAULT_CONFIG)
    port: int = 8000
    bind: str = "127.0.0.1"
    state_dir: str = ".workbench"
    hub_config_dir: str = str(HUB_CONFIG_DIR)
    allow_demo_auth_on_network: bool = False
    system_users: bool | None = None  # None: when root and the venv is usable by other users
    log_to_console: bool = False
    ready_timeout: float = 180.0
    fake_gpus: str = ""  # "h100:2": pretend devices, for tests on machines without a GPU
    gateway_backend: str = "local"  # "local" or "slurm"
    spawner: str = "local"  # "local" or "slurm" (notebook servers as Slurm jobs: workbench.spawn.slurm)
    quota_every: float = 30.0  # seconds between budget enforcement rounds (quota service, gateway)
    quota: bool = True  # run the quota service (budgets enforced, usage recorded)
    subdomains: bool | None = None  # each user's server on its own origin (workbench.origins); None: on if it can be
    subdomain_host: str = ""  # with subdomains: the hub's origin (default http://localhost:<port>)


#: the internal ports of one workbench, remembered in ``<state>/ports.json`` (the public one is ``--port``)
PORT_NAMES = (
    "hub_port",
    "proxy_api_port",
    "gateway_port",
    "gateway_http_port",
    "gateway_tcp_port",
    "gateway_guard_port",
    "quota_port",
    "sessions_port",
    "rosters_port",
    "jobs_port",
)
PORTS_FILE = "ports.json"


def choose_ports(
    remembered: dict,
    names=PORT_NAMES,
    in_use: Callable[[int], bool] | None = None,
    pick: Callable[[], int] = free_port,
    reserved: tuple[int, ...] = (),
) -> tuple[dict[str, int], list[str]]:
    """Ports for ``names``: the remembered one when it is free, else a new free one (pure but for the two callables).
    ``reserved`` ports (the public ``--port``) are never given to a name.

    Returns the ports and one note per port that could not be reused (what runs from the previous start and
    talks to it, such as a server's ``JUPYTERHUB_API_URL``, will not reach it).
    """
    in_use = in_use or (lambda port: port_in_use("127.0.0.1", port))
    ports, notes, taken = {}, [], set(reserved)
    for name in names:
        old = remembered.get(name)
        if isinstance(old, int) and not isinstance(old, bool) and 0 < old < 65536 and old not in taken:
            if not in_use(old):
                ports[name] = old
                taken.add(old)
                continue
            notes.append(f"{name} {old} is in use now")
        new = pick()
        while new in taken:
            new = pick()
        ports[name] = new
        taken.add(new)
    return ports, notes


def stable_ports(state: Path, public_port: int = 0) -> dict[str, int]:
    """The internal ports of the workbench of ``state``: those of its previous start when free (logged), saved."""
    path = state / PORTS_FILE
    try:
        remembered = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        remembered = {}
    if not isinstance(remembered, dict):
        remembered = {}
    ports, notes = choose_ports(remembered, reserved=(public_port,) if public_port else ())
    reused = [n for n in PORT_NAMES if remembered.get(n) == ports[n]]
    if reused:
        say(
            f"reusing the ports of the previous start from {path} (hub API {ports['hub_port']}, proxy API "
            f"{ports['proxy_api_port']}), so servers still running from it keep reaching the hub"
        )
    for note in notes:
        say(f"WARNING: {note}: picked another; servers still running from the previous start cannot reach it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ports, f, indent=2)
    return ports


def local_gpus(policy: Policy, fake: str = "") -> dict[str, list[str]]:
    if fake:
        return parse_fake_gpus(fake)
    return inventory(policy, detect_devices())


def slurm_problem(system_users: bool) -> str | None:
    """Why the Slurm backend cannot run here (None: it can)."""
    if not system_users:
        return (
            "--gateway-backend slurm submits jobs as each user's own Unix account: run as root, from a checkout "
            "other users can reach (see the warning above)"
        )
    if not shutil.which("sbatch"):
        return "--gateway-backend slurm: sbatch not found; run `make slurm` (one-node Slurm) or install Slurm's client"
    if not shutil.which("sudo"):
        return (
            "--gateway-backend slurm needs sudo (the backend submits as each user with sudo -u); apt-get install sudo"
        )
    return None


def find_proxy(venv_bin: Path) -> str | None:
    for candidate in (
        venv_bin / "configurable-http-proxy",
        venv_bin.parent / "node_modules/.bin/configurable-http-proxy",
    ):
        if candidate.exists():
            return str(candidate)
    return shutil.which("configurable-http-proxy")


def decide_system_users(opts: UpOptions, venv_bin: Path) -> tuple[bool, str]:
    """Whether to run servers as per-user system accounts, and a warning if not."""
    if opts.system_users is False:
        return (
            False,
            "--no-system-users: every server runs as the current user; users are NOT isolated from each other.",
        )
    if os.geteuid() != 0:
        if opts.system_users:
            raise SystemExit(fail("--system-users needs root (it creates one Unix account per user)"))
        return False, (
            "not running as root: every single-user server runs as the current user, so users are NOT "
            "isolated from each other. Run as root for one Unix account per user."
        )
    ok, blocker = others_can_execute(venv_bin / "python")
    if not ok:
        msg = (
            f"{blocker} is not reachable by other users, so per-user accounts could not run the Python "
            f"environment in {venv_bin.parent}; servers run as root instead (NOT isolated). Put the "
            f"checkout in a folder other users can traverse (e.g. chmod o+x {blocker})."
        )
        if opts.system_users:
            raise SystemExit(fail(msg))
        return False, msg
    return True, ""


def subdomain_host_for(opts: UpOptions) -> tuple[str, str]:
    """The hub's origin with subdomains ('' without) and a warning when the default falls back to none.

    ``--subdomain-host`` wins; else subdomains are on by default at ``http://localhost:<port>`` (browsers resolve
    every ``*.localhost`` to loopback), except with ``--no-subdomains`` or on a non-loopback ``--bind``, where
    ``*.localhost`` reaches nobody else's browser: there the default falls back to paths of one origin with a
    warning, and an explicit ``--subdomains`` is an error naming the fix.
    """
    if opts.subdomain_host:
        return check_subdomain_host(opts.subdomain_host, "--subdomain-host"), ""
    if opts.subdomains is False:
        return "", ""
    if not is_loopback(opts.bind):
        fix = "pass --subdomain-host https://<name> whose wildcard *.<name> resolves to this machine"
        if opts.subdomains:
            raise SubdomainHostError(
                f"--subdomains on --bind {opts.bind}: *.localhost names reach this machine only from its own browser; {fix}"
            )
        return "", (
            f"--bind {opts.bind} without --subdomain-host: users' servers share the hub's origin (no per-user "
            f"origins, *.localhost reaches only this machine's browser); {fix}, or --no-subdomains to silence this"
        )
    return f"http://localhost:{opts.port}", ""


class Supervisor:
    def __init__(self, opts: UpOptions):
        self.opts = opts
        self.hub: subprocess.Popen | None = None
        self.stopping = False
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant seen

    # -- process bookkeeping ------------------------------------------------------

    def track(self) -> list[psutil.Process]:
        """Descendants to stop with the workbench: all but running notebook jobs, which outlive it (the next
        ``workbench up`` on this state folder follows them again; see :func:`workbench.jobs.engines.local_job_processes`)."""
        from workbench.jobs.engines import local_job_processes

        try:
            jobs = local_job_processes(Path(self.opts.state_dir).resolve())
            kids = [p for p in psutil.Process().children(recursive=True) if p.pid not in jobs]
        except psutil.Error:
            return []
        for p in kids:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return kids

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def kill_leftovers(self) -> int:
        """Kill every descendant still alive; returns how many there were."""
        killed = 0
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.track() if _alive(p)]
            if not alive:
                break
            killed = max(killed, len(alive))
            for p in alive:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=wait)
            self.reap()
        self.reap()
        return killed

    # -- main --------------------------------------------------------------------

    def run(self) -> int:
        opts = self.opts
        if ACCOUNT_PREFIX_PROBLEM:  # the account namespace of every process started below (workbench.sysusers)
            return fail(ACCOUNT_PREFIX_PROBLEM)
        config = Path(opts.config).resolve()
        try:
            policy = load_policy(config)
        except PolicyError as e:
            return fail(str(e))
        say(f"policy {config} is valid: {len(policy.groups)} groups, {len(policy.profiles)} profiles")
        try:
            check_demo_exposure(policy.auth.type, opts.bind, opts.allow_demo_auth_on_network)
        except DemoAuthExposed as e:
            return fail(str(e))
        if policy.auth.type == "demo" and opts.allow_demo_auth_on_network:
            say(f"WARNING: demo auth (one shared password) is exposed on {opts.bind}:{opts.port}")

        venv_bin = Path(sys.executable).parent
        proxy = find_proxy(venv_bin)
        if not proxy:
            return fail(
                "configurable-http-proxy not found next to this Python or on PATH; run `make up` "
                "(it installs it with npm into .venv) or `npm install -g configurable-http-proxy`"
            )
        hub_config = Path(opts.hub_config_dir).resolve()
        if not (hub_config / "jupyterhub_config.py").exists():
            return fail(f"{hub_config}/jupyterhub_config.py not found; pass --hub-config-dir")
        if port_in_use(opts.bind, opts.port):
            return fail(f"{opts.bind}:{opts.port} is already in use; stop what uses it or pass --port")

        try:
            subdomain_host, subdomain_warning = subdomain_host_for(opts)
        except SubdomainHostError as e:
            return fail(str(e))
        if subdomain_warning:
            say(f"WARNING: {subdomain_warning}")

        system_users, warning = decide_system_users(opts, venv_bin)
        if warning:
            say(f"WARNING: {warning}")
        if system_users and USER_PREFIX != DEFAULT_ACCOUNT_PREFIX:
            say(
                f"accounts in the namespace {USER_PREFIX!r} ({ACCOUNT_PREFIX_ENV}): {USER_PREFIX}<user>, {USER_PREFIX}g-<group>"
            )
        if opts.gateway_backend == "slurm" or opts.spawner == "slurm":
            problem = slurm_problem(system_users)
            if problem:
                return fail(
                    problem if opts.gateway_backend == "slurm" else problem.replace("--gateway-backend", "--spawner")
                )

        try:
            gpus = local_gpus(policy, opts.fake_gpus)
        except ValueError as e:
            return fail(str(e))
        unknown = sorted(set(gpus) - set(policy.gpu_types))
        if unknown:
            return fail(
                f"--fake-gpus names unknown GPU types {unknown}; the policy defines: {sorted(policy.gpu_types)}"
            )
        found = {t: len(ids) for t, ids in gpus.items() if ids}
        say(
            "GPUs: "
            + (
                ", ".join(f"{n}\u00d7 {t}" for t, n in found.items())
                if found
                else "none found (GPU profiles will say so)"
            )
            + (" [PRETEND devices from --fake-gpus]" if opts.fake_gpus else "")
        )

        # the hub, its proxy and services (and what they write: databases, logs, pid files) are private to
        # this account; single-user servers and Dask processes set their own umask 022 when they start
        os.umask(SERVICES_UMASK)
        state = make_private_state_dir(Path(opts.state_dir).resolve())
        load_or_create_secrets(state)
        ports = stable_ports(state, opts.port)
        runtime = Runtime(
            config=str(config),
            state_dir=str(state),
            hub_config_dir=str(hub_config),
            venv_bin=str(venv_bin),
            proxy_command=proxy,
            bind=opts.bind,
            port=opts.port,
            hub_port=ports["hub_port"],
            proxy_api_port=ports["proxy_api_port"],
            gateway_port=ports["gateway_port"],
            gateway_http_port=ports["gateway_http_port"],
            gateway_tcp_port=ports["gateway_tcp_port"],
            gateway_guard_port=ports["gateway_guard_port"],
            quota_port=ports["quota_port"]
            if opts.quota
            else 0,  # workbench.services.quota as a hub service (0: not run)
            quota_every=opts.quota_every,
            sessions_port=ports["sessions_port"],  # workbench.services.sessions.app (session limits, idle culling)
            rosters_port=ports["rosters_port"],  # workbench.services.rosters.app (course rosters loaded by instructors)
            system_users=system_users,
            allow_demo_auth_on_network=opts.allow_demo_auth_on_network,
            gpus=gpus,
            gateway_backend=opts.gateway_backend,
            extra={"jobs_port": ports["jobs_port"]}
            | (
                {"slurm_conf": os.environ.get("SLURM_CONF", "")}
                if "slurm" in (opts.gateway_backend, opts.spawner)
                else {}
            )
            | ({"spawner": "slurm"} if opts.spawner == "slurm" else {})
            | ({"subdomain_host": subdomain_host} if subdomain_host else {}),
        )
        runtime_file = runtime.write()

        env = dict(os.environ)
        env[RUNTIME_ENV] = str(runtime_file)
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        password = os.environ.get(PASSWORD_ENV) or ""
        generated = False
        if policy.auth.type == "demo" and not password:
            password, generated = pysecrets.token_urlsafe(9), True
        env[PASSWORD_ENV] = password

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass

        log_path = state / "logs" / "hub.log"
        say(f"starting JupyterHub, its proxy, Dask Gateway, the quota and sessions services (log: {log_path})")
        if not opts.quota:
            say("WARNING: --no-quota: budgets and caps are not enforced and usage is not recorded")
        log_file = None if opts.log_to_console else open(log_path, "ab")
        self.hub = subprocess.Popen(
            [sys.executable, str(HUB_LAUNCHER), "-f", str(hub_config / "jupyterhub_config.py")],
            cwd=state,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file else None,
            start_new_session=True,
            # if we were started with SIGINT ignored (nohup, background jobs), the hub and its services
            # would inherit that and each take its stop timeout to die; give them the default back
            preexec_fn=_default_signals,
        )
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

        code = 0
        if self._wait_ready(runtime, log_path):
            self._banner(policy, runtime, password, generated, log_path)
            while not self.stopping and self.hub.poll() is None:
                self.track()
                time.sleep(0.5)
            if not self.stopping:
                code = 1
                say(f"JupyterHub exited unexpectedly (code {self.hub.returncode}); see {log_path}")
                self._tail(log_path)
        else:
            code = 1
        self.shutdown()
        if log_file:
            log_file.close()
        return code

    def _on_signal(self, signum, frame):
        if not self.stopping:
            say(f"received {signal.Signals(signum).name}, stopping…")
        self.stopping = True

    def _wait_ready(self, runtime: Runtime, log_path: Path) -> bool:
        # ready = the hub answers, the proxy routes to the gateway (added after the hub's own route), and the
        # services a user's first steps need answer: the quota service admits every start (a start before it
        # answers is refused with 503) and the jobs service takes the "Create Notebook Job" form. The hub itself
        # waits for its services (workbench.hubapp); these checks go through the proxy, as users' requests do.
        checks = [
            ("the hub", f"{runtime.public_url}/hub/health"),
            ("Dask Gateway", f"{runtime.gateway_public_url}/api/health"),
        ]
        if runtime.quota_port:
            checks.append(("the quota service", f"{runtime.public_url}/services/{QUOTA_SERVICE}/api/health"))
        if (runtime.extra or {}).get("jobs_port"):
            checks.append(("the jobs service", f"{runtime.public_url}/services/{JOBS_SERVICE}/api/health"))
        deadline = time.monotonic() + self.opts.ready_timeout
        last_note = 0.0
        while checks and time.monotonic() < deadline and not self.stopping:
            if self.hub.poll() is not None:
                say(f"JupyterHub exited during start-up (code {self.hub.returncode}); last lines of {log_path}:")
                self._tail(log_path)
                return False
            name, url = checks[0]
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    say(f"{name} is up")
                    checks.pop(0)
                    continue
            except requests.RequestException:
                pass
            if time.monotonic() - last_note > 10:
                say(f"waiting for {name} ({url}) …")
                last_note = time.monotonic()
            self.track()
            time.sleep(0.3)
        if not checks:
            return True
        if not self.stopping:
            say(f"the hub did not become ready within {self.opts.ready_timeout:.0f}s; last lines of {log_path}:")
            self._tail(log_path)
        return False

    def _tail(self, log_path: Path, n: int = 40) -> None:
        if self.opts.log_to_console or not log_path.exists():
            return
        for line in log_path.read_text(errors="replace").splitlines()[-n:]:
            print(f"    {line}", file=sys.stderr)

    def _banner(self, policy: Policy, runtime: Runtime, password: str, generated: bool, log_path: Path) -> None:
        url = f"http://{runtime.bind if runtime.bind not in ('0.0.0.0', '::') else runtime.connect_host}:{runtime.port}"
        # with subdomains: the hub's origin, each server on <user>.<host>, pages on `url` redirected (workbench.origins)
        hub_origin = runtime.extra.get("subdomain_host")
        lines = ["", f"  Workbench is ready:  {hub_origin or url}/", ""]
        if hub_origin:
            scheme, host = hub_origin.split("://", 1)
            lines.insert(-1, f"  Each user's server at its own origin: {scheme}://<user>.{host}/user/<user>/")
            if url != hub_origin:
                lines.insert(-1, f"  ({url}/ redirects to {hub_origin}/, where the login cookie lives)")
        if policy.auth.type == "demo":
            src = "generated for this run" if generated else f"from ${PASSWORD_ENV}"
            lines.append(f"  Demo logins (password {password!r}, {src}):")
            for name, user in policy.auth.demo_users.items():
                kinds = ", ".join(f"{g} ({policy.groups[g].kind})" for g in user.groups)
                sys_user = f"  [runs as {system_username(name, runtime.user_prefix)}]" if runtime.system_users else ""
                lines.append(f"    {name:<12} {kinds}{sys_user}")
            lines.append("")
        lines += [
            f"  Dask Gateway:  {runtime.gateway_public_url}  (Gateway() works with no arguments in a notebook)",
            f"  Usage, budgets: {runtime.public_url}/services/quota/api/openapi.json  (`workbench report` for tables)"
            if runtime.quota_port
            else "  Usage, budgets: not recorded (--no-quota)",
            f"  State folder:  {runtime.state_dir}",
            f"  Hub log:       {log_path}",
            "",
            "  Press Ctrl-C to stop.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def shutdown(self) -> None:
        hub = self.hub
        if hub is not None and hub.poll() is None:
            say("stopping JupyterHub (it stops the servers, Dask clusters, services and proxy) …")
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(timeout=60)
            except subprocess.TimeoutExpired:
                say("JupyterHub did not stop within 60 s; killing it")
                hub.kill()
                hub.wait()
        # give the gateway's processes a moment to finish their own clean-up
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self.track()):
            self.reap()
            time.sleep(0.2)
        leftovers = self.kill_leftovers()
        if leftovers:
            say(f"killed {leftovers} leftover process(es)")
        say("stopped; no processes left behind")


def up(opts: UpOptions) -> int:
    return Supervisor(opts).run()
