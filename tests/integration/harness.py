"""Start and drive a real embedded workbench (`workbench up`) from tests and benchmarks.

Nothing is mocked: a real JupyterHub with configurable-http-proxy, real JupyterLab servers,
a real dask-gateway-server with its local backend.

The harness asserts the mode it expects. Run as root (as `make test` does), every workbench it starts must
run each user as their own Unix account (``wb-<name>``): it passes ``--system-users`` (which makes
`workbench up` stop rather than fall back to one shared account) and checks the runtime says so, so the
per-user isolation checks always run and a fallback fails the test instead of skipping them. Not run as root,
:meth:`Workbench.start` fails saying why, unless the caller explicitly asks for ``system_users=False``.

Origins. `workbench up` serves each user's server from its own origin by default (``subdomains=True`` here:
the hub at ``http://localhost:<port>``, :attr:`Workbench.url`; servers at :meth:`Workbench.server_url`,
``http://<user>.localhost:<port>/user/<user>/``, which Python reaches through the ``*.localhost`` resolver of
tests/conftest.py; ``http://127.0.0.1:<port>``, :attr:`Workbench.loopback_url`, redirects pages to the hub's
origin and keeps the hub's API and the services). The modules that prove the README's main path run that way:
test_embedded.py (``test_full_flow_login_server_gateway_xarray_and_clean_stop``), test_origins.py and
tests/browser/test_origins_browser.py. Every other module, including the shared ``demo_wb`` and ``demo_gpus_wb``
workbenches, reaches servers by path on 127.0.0.1 and gets ``subdomains=False`` (the harness's default), which
passes ``--no-subdomains``.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "hub_config" / "demo.yaml"
PASSWORD = "integration-test-password"


def state_dir(prefix: str = "wb-it-") -> Path:
    """A fresh state folder under /tmp (not pytest's 0700 tmp_path), so per-user processes can traverse it."""
    parent = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    parent.chmod(0o711)
    return parent / "state"


def namespaced_config(config: Path, dest: Path) -> Path:
    """``config`` itself in the default account namespace; in another (``WORKBENCH_ACCOUNT_PREFIX``, set by
    tests/conftest.py for each parallel worker but the first) a copy at ``dest`` whose group, course and dataset
    folders are under ``/srv/workbench-<namespace>/`` unless the policy names its own: those folders are
    machine-wide and owned by the namespace's Unix groups, so two workbenches of two namespaces must not share
    them (the README's paragraph on namespaces says the same to a centre)."""
    from workbench.sysusers import DEFAULT_ACCOUNT_PREFIX, USER_PREFIX

    if USER_PREFIX == DEFAULT_ACCOUNT_PREFIX:
        return config
    import yaml

    data = yaml.safe_load(config.read_text())
    root = f"/srv/workbench-{USER_PREFIX.rstrip('-')}"
    storage = data.setdefault("storage", {}) or {}
    data["storage"] = storage
    storage.setdefault("shared", f"{root}/groups/{{group}}")
    storage.setdefault("courses", f"{root}/courses/{{course}}")
    storage.setdefault("datasets", f"{root}/datasets")
    dest.write_text(yaml.safe_dump(data))
    return dest


class LocalhostCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """Python's cookie policy, except that a ``Domain=localhost`` cookie set by ``localhost`` is kept (as a cookie of
    ``localhost`` itself). With subdomains the hub sets its session cookie (to which its XSRF tokens are bound) for
    ``Domain=localhost``, which :mod:`http.cookiejar` refuses (no embedded dot): without this a form login works but
    every later cookie-authenticated API call fails JupyterHub's XSRF check. Browsers also send that cookie to
    ``*.localhost``; requests copies a session's cookies into a jar with the default policy for each request, so
    the cookie is stored as ``localhost``'s own (``localhost.local`` in cookielib's terms), which that policy sends to
    the hub's origin only (all the harness needs)."""

    def set_ok(self, cookie, request):
        host = (urlsplit(request.get_full_url()).hostname or "").lower()
        if cookie.domain.lstrip(".").lower() == "localhost" and host == "localhost":
            cookie.domain, cookie.domain_specified, cookie.domain_initial_dot = "localhost.local", False, False
        return super().set_ok(cookie, request)


def browser_session() -> requests.Session:
    """A ``requests`` session that keeps cookies as a browser does on ``localhost`` (:class:`LocalhostCookiePolicy`)."""
    s = requests.Session()
    s.cookies.set_policy(LocalhostCookiePolicy())
    return s


#: under pytest-xdist each worker picks the harness's ports from its own range (below Linux's ephemeral ports,
#: 32768-60999, from which the workbenches' own port-0 picks come), so two workers never race for one port
_PORT_RANGE = 2000


def free_port() -> int:
    """A free loopback port: the kernel's pick (port 0), or under xdist a free one of this worker's own range."""
    m = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    if m is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    low = 12000 + int(m.group(1)) * _PORT_RANGE
    start = random.randrange(_PORT_RANGE)
    for i in range(_PORT_RANGE):
        port = low + (start + i) % _PORT_RANGE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + _PORT_RANGE - 1}")


class Workbench:
    """One `workbench up` process on free ports with its own state folder.

    ``system_users``: the mode the test expects. ``True`` (the default) requires per-user Unix accounts: the
    harness must run as root, passes ``--system-users`` and checks the started workbench uses them. ``False``
    passes ``--no-system-users`` (every server as the current user) for a test that wants that mode.
    ``subdomains``: ``True`` runs `workbench up`'s default (each server on its own origin), ``False`` passes
    ``--no-subdomains`` (every server a path of one origin; see the module docstring for who does).
    """

    def __init__(
        self,
        state_dir: Path,
        config: Path = DEMO,
        extra_args: tuple[str, ...] = (),
        env: dict | None = None,
        system_users: bool = True,
        subdomains: bool = False,
    ):
        self.state_dir = Path(state_dir)
        self.expect_system_users = system_users
        self.config = namespaced_config(Path(config), self.state_dir.parent / f"{self.state_dir.name}-policy.yaml")
        self.port = free_port()
        self.subdomains = subdomains
        self.loopback_url = f"http://127.0.0.1:{self.port}"  # the proxy by address (pages redirect with subdomains)
        self.url = f"http://localhost:{self.port}" if subdomains else self.loopback_url  # the hub's origin
        self.extra_args = extra_args
        self.env = dict(env or {})  # extra environment of `workbench up` (e.g. an OAuth client secret)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-up.log"
        self.seen: dict[int, float] = {}

    # -- lifecycle -----------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            str(VENV_BIN / "workbench"),
            "up",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--system-users" if self.expect_system_users else "--no-system-users",
            *(() if self.subdomains else ("--no-subdomains",)),
            *self.extra_args,
        ]

    def start(self, timeout: float = 180) -> Workbench:
        if self.expect_system_users and os.geteuid() != 0:
            raise RuntimeError(
                "the integration tests check per-user isolation, which needs one Unix account per user: "
                "run them as root (as `make test` does), or pass system_users=False for a test of the other mode"
            )
        env = {**os.environ, "WORKBENCH_DEMO_PASSWORD": PASSWORD, **self.env}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"workbench up exited with {self.proc.returncode}:\n{self.output()}")
            if "Workbench is ready" in self.output():
                r = requests.get(f"{self.url}/hub/health", timeout=5)
                assert r.status_code == 200, r.text
                # "ready" includes the services a user's first start and job need (workbench.embedded.up)
                for service in ("quota", "jobs") if self.runtime.get("quota_port") else ("jobs",):
                    r = requests.get(f"{self.url}/services/{service}/api/health", timeout=5)
                    assert r.status_code == 200, f"ready before the {service} service answered: {r.status_code}"
                assert self.system_users is self.expect_system_users, (
                    f"expected system_users={self.expect_system_users}, the workbench runs with "
                    f"{self.runtime['system_users']}:\n{self.output()}"
                )
                self.snapshot()
                return self
            time.sleep(0.3)
        raise TimeoutError(f"workbench not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def hub_log(self) -> str:
        p = self.state_dir / "logs" / "hub.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @property
    def runtime(self) -> dict:
        return json.loads((self.state_dir / "runtime.json").read_text())

    @property
    def system_users(self) -> bool:
        """Whether this workbench runs each user as their own Unix account (see `workbench up`)."""
        return bool(self.runtime["system_users"])

    def snapshot(self) -> list[psutil.Process]:
        """Record every process `workbench up` has started so far."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for p in kids:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return kids

    def stop(self, timeout: float = 120) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.snapshot()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def leftovers(self) -> list[str]:
        """Processes seen during the run that are still alive (same pid and start time)."""
        alive = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {p.username()} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                pass
        return alive

    def home(self, username: str) -> Path:
        """The home folder of ``username``'s account (``wb-<name>``; the harness requires per-user accounts)."""
        import pwd

        assert self.expect_system_users, "homes of the --no-system-users mode live in the state folder"
        return Path(pwd.getpwnam(f"{self.runtime.get('user_prefix', 'wb-')}{username}").pw_dir)

    def server_process(self, username: str) -> psutil.Process:
        """The single-user server of ``username`` started by this workbench (other runs may exist)."""
        for p in self.snapshot():
            try:
                cmd = " ".join(p.cmdline())
                env = p.environ()
            except psutil.Error:
                continue
            if "jupyterhub-singleuser" in cmd and env.get("JUPYTERHUB_USER") == username:
                return p
        raise AssertionError(f"no single-user server process for {username}")

    def server_url(self, username: str) -> str:
        """Where ``username``'s server is: ``http://<user>.localhost:<port>/user/<user>/`` on its own origin
        (resolved to 127.0.0.1 by tests/conftest.py, as browsers do), else a path of the hub's origin."""
        if self.subdomains:
            return f"http://{username}.localhost:{self.port}/user/{username}/"
        return f"{self.url}/user/{username}/"

    # -- users -----------------------------------------------------------------------

    def login(self, username: str, password: str = PASSWORD) -> requests.Session:
        """Log in through the real login form; returns a session holding the hub cookie."""
        s = browser_session()
        r = s.get(f"{self.url}/hub/login", timeout=10)
        r.raise_for_status()
        m = re.search(r'name="_xsrf"\s+value="([^"]+)"', r.text)
        assert m, "login form has no _xsrf field"
        r = s.post(
            f"{self.url}/hub/login",
            data={"username": username, "password": password, "_xsrf": m.group(1)},
            allow_redirects=False,
            timeout=30,
        )
        s.login_status = r.status_code
        return s

    def api(self, session: requests.Session, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers["X-XSRFToken"] = session.cookies.get("_xsrf", path="/hub/") or ""
        return session.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kw)

    def new_token(self, session: requests.Session, username: str, scopes: list[str] | None = None) -> str:
        body = {"note": "integration test"}
        if scopes is not None:
            body["scopes"] = scopes
        r = self.api(session, "POST", f"/users/{username}/tokens", json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()["token"]

    def token_api(self, token: str, method: str, path: str, **kw) -> requests.Response:
        return requests.request(
            method, f"{self.url}/hub/api{path}", headers={"Authorization": f"token {token}"}, timeout=30, **kw
        )

    def start_server(self, token: str, username: str, timeout: float = 180, **options) -> dict:
        r = self.token_api(token, "POST", f"/users/{username}/server", json=options or None)
        assert r.status_code in (201, 202), f"{r.status_code} {r.text}\nhub log:\n{self.hub_log()[-4000:]}"
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout:
            model = self.token_api(token, "GET", f"/users/{username}").json()
            server = model.get("servers", {}).get("")
            if server and server.get("ready"):
                return server
            if not server and time.monotonic() > t0 + 5:  # the spawn failed and was cleared
                raise RuntimeError(f"server of {username} failed to start: {model}\n{self.hub_log()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"server of {username} not ready after {timeout}s")

    def stop_server(self, token: str, username: str, timeout: float = 60) -> None:
        r = self.token_api(token, "DELETE", f"/users/{username}/server")
        assert r.status_code in (202, 204), r.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.token_api(token, "GET", f"/users/{username}").json()
            if not model.get("servers"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"server of {username} did not stop")

    def gateway(self, token: str):
        """A dask-gateway client for ``token``'s owner (close it: use ``with``).

        Garbage is collected first, here: ``Gateway.__init__`` starts its loop thread while holding
        distributed's class-wide ``LoopRunner._lock``, and a collection that finalizes an unclosed
        ``Gateway`` inside that new thread (``__del__`` -> ``close()`` -> the same lock) deadlocks.
        """
        import gc

        from dask_gateway import Gateway, JupyterHubAuth

        gc.collect()

        rt = self.runtime
        return Gateway(
            address=f"{self.url}/services/dask-gateway",
            proxy_address=f"gateway://127.0.0.1:{rt['gateway_tcp_port']}",
            auth=JupyterHubAuth(api_token=token),
        )
