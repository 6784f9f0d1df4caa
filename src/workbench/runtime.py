"""Runtime settings of one embedded workbench: where things live and which ports they use.

``workbench up`` decides these once, writes them to ``<state>/runtime.json`` and points
the hub and the gateway at that file with ``WORKBENCH_RUNTIME``; the thin loaders in
``hub_config/`` read it back. Secrets live beside it in ``secrets.json`` (mode 0600) and
are generated once, so restarts keep cookies, tokens and the gateway's encrypted DB valid.

The state folder is private to the account that runs the platform (:func:`make_private_state_dir`:
0700, and ``workbench up`` runs the hub and its services with umask 077). Nothing in it is for
users: their Dask clusters' folders live under ``/tmp`` (see ``workbench.gateway.local``), and the
hub uses no internal certificates in the embedded mode.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from workbench.names import GATEWAY_SERVICE
from workbench.sysusers import USER_PREFIX

RUNTIME_ENV = "WORKBENCH_RUNTIME"


@dataclass(frozen=True)
class Runtime:
    config: str  # absolute path of the platform YAML
    state_dir: str
    hub_config_dir: str
    venv_bin: str  # folder with jupyterhub-singleuser, dask, dask-gateway-server
    proxy_command: str  # configurable-http-proxy executable
    bind: str = "127.0.0.1"
    port: int = 8000
    hub_port: int = 8081
    proxy_api_port: int = 8001
    gateway_port: int = 8010  # gateway's private API
    gateway_http_port: int = 8011
    gateway_tcp_port: int = 8012
    gateway_guard_port: int = (
        8013  # workbench.gateway.dashguard: the hub service `dask-gateway`, in front of the HTTP proxy
    )
    quota_port: int = 0  # workbench.services.quota: the hub service `quota` (0: not run)
    sessions_port: int = (
        0  # workbench.services.sessions.app: the hub service `sessions` (0: a free port when the hub starts)
    )
    rosters_port: int = (
        0  # workbench.services.rosters.app: the hub service `rosters` (0: a free port when the hub starts)
    )
    quota_every: float = 30.0  # seconds between budget checks (quota service) and ledger reconciles (gateway)
    system_users: bool = False  # spawn as one system user per hub user (needs root)
    user_prefix: str = USER_PREFIX  # the account namespace (workbench.sysusers.ACCOUNT_PREFIX_ENV)
    allow_demo_auth_on_network: bool = False
    gateway_backend: str = "local"
    gpus: dict = field(default_factory=dict)  # {gpu_type: [device ids]} of this machine
    extra: dict = field(default_factory=dict)

    @property
    def connect_host(self) -> str:
        """Host that local processes use to reach the public proxy."""
        if self.bind in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return self.bind

    @property
    def public_url(self) -> str:
        host = self.connect_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def gateway_public_url(self) -> str:
        return f"{self.public_url}/services/{GATEWAY_SERVICE}"

    @property
    def gateway_proxy_address(self) -> str:
        return f"gateway://127.0.0.1:{self.gateway_tcp_port}"

    def path(self, *parts: str) -> Path:
        return Path(self.state_dir, *parts)

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def write(self) -> Path:
        p = self.path("runtime.json")
        p.write_text(self.dump())
        return p

    @classmethod
    def read(cls, path: str | os.PathLike) -> Runtime:
        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def from_env(cls) -> Runtime:
        path = os.environ.get(RUNTIME_ENV)
        if not path:
            raise RuntimeError(
                f"{RUNTIME_ENV} is not set: this configuration is started by `workbench up`, "
                "which writes <state>/runtime.json and sets it"
            )
        return cls.read(path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


SECRET_NAMES = (
    "cookie_secret",
    "proxy_auth_token",
    "gateway_api_token",
    "culler_api_token",
    "gateway_db_key",
    "quota_api_token",
    "sessions_api_token",
    "rosters_api_token",
    "jobs_api_token",
)


def _new_secret(name: str) -> str:
    if name == "gateway_db_key":  # a Fernet key for dask-gateway's db_encrypt_keys
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    return secrets.token_hex(32)


def load_or_create_secrets(state_dir: str | os.PathLike) -> dict[str, str]:
    """Secrets of this state folder, generated on first use and kept (mode 0600)."""
    path = Path(state_dir, "secrets.json")
    current: dict[str, str] = {}
    if path.exists():
        current = json.loads(path.read_text())
    missing = [n for n in SECRET_NAMES if not current.get(n)]
    if missing:
        for n in missing:
            current[n] = _new_secret(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(current, f, indent=2)
    os.chmod(path, 0o600)
    return current


#: what ``workbench up`` runs the hub and its services with: everything they create is theirs alone
SERVICES_UMASK = 0o077


def make_private_state_dir(state_dir: str | os.PathLike) -> Path:
    """Create the state folder and its ``logs`` folder 0700; tighten what an older run left readable.

    Earlier versions made the folder 0711 with 0644 files: its regular files and those of ``logs``
    lose group and other permissions, through descriptors opened without following symlinks (the
    folder is root's, but a cluster folder of an old run inside it was not: nothing else is walked).
    """
    state = Path(state_dir)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    logs = state / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    os.chmod(logs, 0o700)
    for folder in (state, logs):
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                mode = os.fstat(fd).st_mode & 0o7777
                if mode & 0o077:
                    os.fchmod(fd, mode & 0o700)
            finally:
                os.close(fd)
    return state
