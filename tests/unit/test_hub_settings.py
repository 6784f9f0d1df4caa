"""Unit tests of workbench.embedded.hub (settings built from policy + runtime) and workbench.runtime."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from workbench.auth.demo import DemoAuthExposed
from workbench.embedded.hub import SERVER_TOKEN_SCOPES, apply_settings, hub_settings, roles, services
from workbench.policy import load_policy, parse_policy
from workbench.runtime import (
    RUNTIME_ENV,
    SECRET_NAMES,
    Runtime,
    is_loopback,
    load_or_create_secrets,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hub_config" / "demo.yaml"

SECRETS = {
    "cookie_secret": "ab" * 32,
    "proxy_auth_token": "proxy-token",
    "gateway_api_token": "gateway-token",
    "culler_api_token": "culler-token",
    "gateway_db_key": "db-key",
    "quota_api_token": "quota-token",
    "sessions_api_token": "sessions-token",
    "rosters_api_token": "rosters-token",
}


def make_runtime(**kw) -> Runtime:
    values = dict(
        config="/srv/wb/platform.yaml",
        state_dir="/srv/wb/state",
        hub_config_dir="/srv/wb/hub_config",
        venv_bin="/srv/wb/.venv/bin",
        proxy_command="/usr/bin/configurable-http-proxy",
        bind="127.0.0.1",
        port=8000,
        hub_port=18081,
        proxy_api_port=18001,
        gateway_port=18010,
        gateway_http_port=18011,
        gateway_tcp_port=18012,
        gateway_guard_port=18013,
        sessions_port=18015,
        rosters_port=18016,
    )
    values.update(kw)
    return Runtime(**values)


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


@pytest.fixture(scope="module")
def settings(demo):
    return hub_settings(demo, make_runtime(), SECRETS)


# ---------------------------------------------------------------------------
# hub_settings
# ---------------------------------------------------------------------------


def test_sections(settings):
    assert set(settings) == {
        "JupyterHub",
        "WorkbenchHub",
        "ConfigurableHTTPProxy",
        "DemoAuthenticator",
        "Authenticator",
        "Spawner",
        "WorkbenchLocalSpawner",
    }


def test_services(settings):
    assert settings["JupyterHub"]["services"] == [
        {
            "name": "dask-gateway-server",
            "command": [
                "/srv/wb/.venv/bin/dask-gateway-server",
                "-f",
                "/srv/wb/hub_config/dask_gateway_config.py",
            ],
            "cwd": "/srv/wb/state",
            "environment": {"WORKBENCH_RUNTIME": "/srv/wb/state/runtime.json"},
        },
        {
            "name": "dask-gateway",
            "url": "http://127.0.0.1:18013",
            "api_token": "gateway-token",
            "oauth_no_confirm": True,
            "command": ["/srv/wb/.venv/bin/python", "-m", "workbench.gateway.dashguard"],
            "cwd": "/srv/wb/state",
            "environment": {"WORKBENCH_RUNTIME": "/srv/wb/state/runtime.json"},
            "timeout": 120,
        },
        {
            "name": "sessions",
            "url": "http://127.0.0.1:18015",
            "api_token": "sessions-token",
            "command": ["/srv/wb/.venv/bin/python", "-m", "workbench.services.sessions", "--interval=300"],
            "cwd": "/srv/wb/state",
            "environment": {"WORKBENCH_RUNTIME": "/srv/wb/state/runtime.json"},
            "timeout": 120,
        },
        {
            "name": "rosters",
            "url": "http://127.0.0.1:18016",
            "api_token": "rosters-token",
            "command": ["/srv/wb/.venv/bin/python", "-m", "workbench.services.rosters"],
            "cwd": "/srv/wb/state",
            "environment": {"WORKBENCH_RUNTIME": "/srv/wb/state/runtime.json"},
            "timeout": 120,
        },
    ]


def test_gateway_service_env_name_matches_runtime_env(settings):
    assert list(settings["JupyterHub"]["services"][0]["environment"]) == [RUNTIME_ENV]


def test_load_roles(settings):
    assert settings["JupyterHub"]["load_roles"] == [
        {
            "name": "workbench-dask-users",
            "description": "May use the Dask Gateway (groups with a dask policy)",
            "scopes": ["access:services!service=dask-gateway"],
            "groups": ["physics-lab", "course-ml101", "startup-acme"],
        },
        {
            "name": "workbench-sessions",
            "description": "Stop servers at their session limit and when idle (workbench.services.sessions.app)",
            "scopes": [
                "list:users",
                "read:users:name",
                "read:users:groups",
                "read:servers",
                "admin:server_state",
                "delete:servers",
            ],
            "services": ["sessions"],
        },
        {
            "name": "workbench-sessions-users",
            "description": "May read their own notifications (session limits, stopped servers)",
            "scopes": ["access:services!service=sessions"],
            "groups": ["physics-lab", "course-ml101", "startup-acme", "platform-admins"],
        },
        {
            "name": "workbench-rosters",
            "description": "Load course rosters for instructors and admins (workbench.services.rosters.app)",
            "scopes": ["admin:users", "groups!group=course-ml101"],
            "services": ["rosters"],
        },
        {
            "name": "instructor-course-ml101",
            "description": "Instructors of course-ml101: list, start, stop and open their students' servers, load rosters",
            "scopes": [
                "list:users!group=course-ml101",
                "read:users!group=course-ml101",
                "read:users:activity!group=course-ml101",
                "servers!group=course-ml101",
                "access:servers!group=course-ml101",
                "read:groups!group=course-ml101",
                "list:groups!group=course-ml101",
                "access:services!service=rosters",
            ],
            "users": ["instructor"],
        },
    ]


def test_server_token_scopes(settings):
    assert settings["Spawner"]["server_token_scopes"] == [
        "users:activity!user",
        "access:servers!server",
        "read:users:groups!user",
        "access:services!service=dask-gateway",
        "access:services!service=sessions",  # the user's session notifications
        "access:services!service=rosters",  # an instructor's notebook may load rosters (only holders get it)
    ]
    # a copy: mutating the settings must not change the module constant
    assert settings["Spawner"]["server_token_scopes"] is not SERVER_TOKEN_SCOPES


def test_jupyterhub_section(settings):
    hub = settings["JupyterHub"]
    assert hub["bind_url"] == "http://127.0.0.1:8000"
    assert hub["hub_bind_url"] == "http://127.0.0.1:18081"
    assert hub["db_url"] == "sqlite:////srv/wb/state/jupyterhub.sqlite"
    assert settings["WorkbenchHub"] == {"sqlite_wal": True}  # a local state folder: WAL (workbench.hubapp)
    assert hub["cookie_secret"] == bytes.fromhex("ab" * 32)
    assert len(hub["cookie_secret"]) == 32
    assert hub["pid_file"] == "/srv/wb/state/jupyterhub.pid"
    assert hub["authenticator_class"] == "workbench.auth.demo.DemoAuthenticator"
    assert hub["spawner_class"] == "workbench.spawn.local.WorkbenchLocalSpawner"
    assert hub["cleanup_servers"] is True
    assert hub["cleanup_proxy"] is True
    assert hub["template_vars"] == {
        "announcement_login": "Workbench demo: log in with a demo account",
        "workbench_branding": {"name": "Workbench demo", "logo_url": ""},  # the policy's name without `branding`
    }
    # the platform's own pages: JupyterHub's templates extended (workbench.spawnpage), and its spawn form
    [templates] = hub["template_paths"]
    assert {p.name for p in Path(templates).glob("*.html")} == {"page.html", "spawn.html"}
    assert settings["WorkbenchLocalSpawner"]["options_form"].__name__ == "spawn_form"


def test_proxy_section(settings):
    assert settings["ConfigurableHTTPProxy"] == {
        "command": ["/usr/bin/configurable-http-proxy"],
        "api_url": "http://127.0.0.1:18001",
        "auth_token": "proxy-token",
        "pid_file": "/srv/wb/state/proxy.pid",
        "should_start": True,
    }


def test_demo_authenticator_accounts(settings):
    assert settings["DemoAuthenticator"] == {
        "accounts": {
            "researcher": {"groups": ["physics-lab"], "admin": False},
            "instructor": {"groups": ["course-ml101"], "admin": False},
            "student1": {"groups": ["course-ml101"], "admin": False},
            "student2": {"groups": ["course-ml101"], "admin": False},
            "startup": {"groups": ["startup-acme"], "admin": False},
            "admin": {"groups": ["platform-admins"], "admin": False},
        },
        "admin_group_names": "platform-admins",
        "course_groups": ["course-ml101"],
    }
    assert settings["Authenticator"] == {"manage_groups": True, "allow_all": False}


def test_spawner_sections(settings):
    assert settings["Spawner"] == {
        "cmd": ["/srv/wb/.venv/bin/jupyterhub-singleuser"],
        "default_url": "/lab",
        "server_token_scopes": [
            *SERVER_TOKEN_SCOPES,
            "access:services!service=sessions",
            "access:services!service=rosters",
        ],
        "start_timeout": 3930.0,  # start_queue_timeout 3600 + slot_start_timeout 300 + 30
        "http_timeout": 90,
        "poll_interval": 10,
    }
    expected = {
        "start_queue_timeout": 3600.0,  # a start waits in line for its slot (workbench.spawn.concurrency)
        "slot_start_timeout": 300.0,
        "policy_path": "/srv/wb/platform.yaml",
        "system_users": False,
        "user_prefix": "wb-",
        "homes_root": "/srv/wb/state/homes",
        "dask_env": {
            "gateway_url": "http://127.0.0.1:8000/services/dask-gateway",
            "proxy_address": "gateway://127.0.0.1:18012",
        },
        "env_keep": ["PATH", "LANG", "LC_ALL"],
        "environment": {"PATH": "/srv/wb/.venv/bin:/usr/local/bin:/usr/bin:/bin"},
        "gateway_api_url": "http://127.0.0.1:18011/services/dask-gateway/api/v1",
    }
    # the section may grow (e.g. local GPUs); the settings above must stay as they are
    section = settings["WorkbenchLocalSpawner"]
    assert {k: section.get(k) for k in expected} == expected


def test_system_users_and_prefix_pass_through(demo):
    s = hub_settings(demo, make_runtime(system_users=True, user_prefix="lab-"), SECRETS)
    assert s["WorkbenchLocalSpawner"]["system_users"] is True
    assert s["WorkbenchLocalSpawner"]["user_prefix"] == "lab-"


def test_no_culling_and_no_session_limits_run_no_sessions_service(demo):
    data = yaml.safe_load(DEMO.read_text())
    data["culling"] = {"enabled": False}
    for g in data["groups"].values():
        g.pop("session", None)
    policy = parse_policy(data)
    s = hub_settings(policy, make_runtime(), SECRETS)
    names = [svc["name"] for svc in s["JupyterHub"]["services"]]
    assert names == ["dask-gateway-server", "dask-gateway", "rosters"]
    # no role may name a service that is not defined (the hub refuses to start)
    assert not [r for r in s["JupyterHub"]["load_roles"] if "sessions" in r.get("services", [])]
    assert "access:services!service=sessions" not in s["Spawner"]["server_token_scopes"]


def test_session_limits_alone_keep_the_sessions_service(demo):
    data = yaml.safe_load(DEMO.read_text())
    data["culling"] = {"enabled": False}  # the demo startup group still has session.max_age
    assert [svc["name"] for svc in services(parse_policy(data), make_runtime(), SECRETS)][-2:] == [
        "sessions",
        "rosters",
    ]


def test_culling_interval_is_seconds():
    data = yaml.safe_load(DEMO.read_text())
    data["culling"] = {"timeout": "2h", "every": 90}
    s = services(parse_policy(data), make_runtime(), SECRETS)
    assert s[2]["command"][-1] == "--interval=90"


def test_roles_without_dask_groups():
    data = yaml.safe_load(DEMO.read_text())
    for g in data["groups"].values():
        g.pop("dask", None)
    assert roles(parse_policy(data))[0]["groups"] == []


def test_demo_auth_on_network_refused(demo):
    with pytest.raises(DemoAuthExposed) as info:
        hub_settings(demo, make_runtime(bind="0.0.0.0"), SECRETS)
    msg = str(info.value)
    assert "'0.0.0.0'" in msg
    assert "--allow-demo-auth-on-network" in msg
    assert "--bind 127.0.0.1" in msg


def test_demo_auth_on_network_allowed_with_flag(demo):
    s = hub_settings(demo, make_runtime(bind="0.0.0.0", allow_demo_auth_on_network=True), SECRETS)
    assert s["JupyterHub"]["bind_url"] == "http://0.0.0.0:8000"
    # local processes still reach the proxy on loopback
    assert s["WorkbenchLocalSpawner"]["dask_env"]["gateway_url"] == "http://127.0.0.1:8000/services/dask-gateway"


def test_demo_auth_on_localhost_ok(demo):
    s = hub_settings(demo, make_runtime(bind="localhost", port=9000), SECRETS)
    assert s["JupyterHub"]["bind_url"] == "http://localhost:9000"


def test_ipv6_loopback_bind_url(demo):
    s = hub_settings(demo, make_runtime(bind="::1"), SECRETS)
    assert s["JupyterHub"]["bind_url"] == "http://[::1]:8000"


def test_hub_settings_missing_secret_raises(demo):
    with pytest.raises(KeyError):
        hub_settings(demo, make_runtime(), {k: v for k, v in SECRETS.items() if k != "sessions_api_token"})


def test_apply_settings_sets_traitlets_config(settings):
    from traitlets.config import Config

    c = Config()
    apply_settings(c, settings)
    assert c.JupyterHub.bind_url == "http://127.0.0.1:8000"
    assert c.Spawner.server_token_scopes == [
        *SERVER_TOKEN_SCOPES,
        "access:services!service=sessions",
        "access:services!service=rosters",
    ]
    assert c.DemoAuthenticator.admin_group_names == "platform-admins"
    assert [s["name"] for s in c.JupyterHub.services] == ["dask-gateway-server", "dask-gateway", "sessions", "rosters"]


# ---------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------


def test_runtime_write_read_round_trip(tmp_path):
    rt = make_runtime(state_dir=str(tmp_path), system_users=True, extra={"k": [1, 2]})
    path = rt.write()
    assert path == tmp_path / "runtime.json"
    data = json.loads(path.read_text())
    assert data["gateway_tcp_port"] == 18012
    assert data["extra"] == {"k": [1, 2]}
    assert Runtime.read(path) == rt


def test_runtime_from_env(tmp_path, monkeypatch):
    rt = make_runtime(state_dir=str(tmp_path))
    monkeypatch.setenv(RUNTIME_ENV, str(rt.write()))
    assert Runtime.from_env() == rt


def test_runtime_from_env_unset(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    with pytest.raises(
        RuntimeError, match=r"^WORKBENCH_RUNTIME is not set: this configuration is started by `workbench up`"
    ):
        Runtime.from_env()


def test_runtime_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        make_runtime().port = 1


def test_runtime_defaults():
    rt = Runtime(config="c", state_dir="s", hub_config_dir="h", venv_bin="v", proxy_command="p")
    assert (rt.bind, rt.port, rt.hub_port, rt.proxy_api_port) == ("127.0.0.1", 8000, 8081, 8001)
    assert (rt.gateway_port, rt.gateway_http_port, rt.gateway_tcp_port) == (8010, 8011, 8012)
    assert rt.system_users is False and rt.user_prefix == "wb-" and rt.allow_demo_auth_on_network is False


@pytest.mark.parametrize(
    "bind, public",
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("", "http://127.0.0.1:8000"),
        ("::", "http://127.0.0.1:8000"),
        ("192.168.1.5", "http://192.168.1.5:8000"),
        ("::1", "http://[::1]:8000"),
    ],
)
def test_public_urls(bind, public):
    rt = make_runtime(bind=bind)
    assert rt.public_url == public
    assert rt.gateway_public_url == f"{public}/services/dask-gateway"
    assert rt.gateway_proxy_address == "gateway://127.0.0.1:18012"


def test_connect_host():
    assert make_runtime(bind="0.0.0.0").connect_host == "127.0.0.1"
    assert make_runtime(bind="10.0.0.1").connect_host == "10.0.0.1"


def test_runtime_path():
    assert make_runtime().path("logs", "hub.log") == Path("/srv/wb/state/logs/hub.log")


def test_secrets_created_mode_0600_and_kept(tmp_path):
    first = load_or_create_secrets(tmp_path)
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == set(SECRET_NAMES)
    assert len(set(first.values())) == len(SECRET_NAMES)  # all different
    for name in SECRET_NAMES:
        if name != "gateway_db_key":
            assert len(first[name]) == 64
            bytes.fromhex(first[name])
    assert len(base64.urlsafe_b64decode(first["gateway_db_key"])) == 32
    second = load_or_create_secrets(tmp_path)
    assert second == first
    assert json.loads(path.read_text()) == first


def test_secrets_gateway_db_key_is_a_fernet_key(tmp_path):
    fernet = pytest.importorskip("cryptography.fernet")
    key = load_or_create_secrets(tmp_path)["gateway_db_key"]
    f = fernet.Fernet(key.encode())
    assert f.decrypt(f.encrypt(b"x")) == b"x"


def test_secrets_fill_missing_keep_existing_and_fix_mode(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"cookie_secret": "keepme", "proxy_auth_token": ""}))
    os.chmod(path, 0o644)
    out = load_or_create_secrets(tmp_path)
    assert out["cookie_secret"] == "keepme"
    assert out["proxy_auth_token"]  # empty values are regenerated
    assert set(out) == set(SECRET_NAMES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == out


def test_secrets_mode_fixed_even_when_complete(tmp_path):
    first = load_or_create_secrets(tmp_path)
    path = tmp_path / "secrets.json"
    os.chmod(path, 0o644)
    assert load_or_create_secrets(tmp_path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "host, expected",
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("example.org", False),
        ("localhost.example.org", False),
    ],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected
