"""Unit tests of the sessions service's pure parts (workbench.services.sessions.rules), its utilisation sources,
its wiring into the hub, and the policy fields it reads (profile session / idle_timeout / gpu_idle_timeout,
culling.warn_before). Inputs are literal: policies, hub user models, GPU samples and ``now``."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workbench.embedded.hub import roles, services
from workbench.gpu_utilisation import FileUtilisation, GpuUtilisation, choose_source
from workbench.policy import Culling, PolicyError, parse_policy
from workbench.runtime import SECRET_NAMES, Runtime
from workbench.services.sessions.app import SessionsService
from workbench.services.sessions.rules import (
    Limits,
    Server,
    decide,
    gpus_idle,
    human,
    needs_service,
    next_due,
    server_limits,
    servers_of,
    update_gpu_idle,
)

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def policy(**over):
    data = {
        "auth": {"type": "demo", "demo_users": {"ada": {"groups": ["lab"]}}},
        "culling": {"timeout": "1h", "every": "1m", "warn_before": ["15m", "5m"]},
        "gpu_types": {"h100": {}},
        "images": {"base": {"image": "b"}},
        "profiles": {
            "cpu": {},
            "gpu": {"gpu": {"type": "h100"}, "idle_timeout": "30m", "gpu_idle_timeout": "20m"},
            "short": {"session": {"max_age": "2h"}},
        },
        "groups": {
            "lab": {"kind": "research", "profiles": ["cpu", "gpu", "short"]},
            "acme": {"kind": "startup", "profiles": ["cpu", "gpu"], "session": {"max_age": "8h"}},
            "acme-long": {"kind": "startup", "profiles": ["gpu"], "session": {"max_age": "12h"}},
        },
    }
    for key, value in over.items():
        data[key] = value
    return parse_policy(data)


P = policy()


def server(user="ada", name="", profile="cpu", groups=("lab",), started=0, active=0, gpus=(), pending=None):
    return Server(
        user=user,
        name=name,
        profile=profile,
        groups=tuple(groups),
        started=at(started),
        last_activity=at(active),
        gpu_devices=tuple(gpus),
        pending=pending,
    )


# -- limits ------------------------------------------------------------------------------------


def test_limits_default_to_culling_timeout():
    assert server_limits(P, ["lab"], "cpu") == Limits(max_age=None, idle_timeout=3600, gpu_idle_timeout=None)


def test_limits_of_a_gpu_profile():
    assert server_limits(P, ["lab"], "gpu") == Limits(max_age=None, idle_timeout=1800, gpu_idle_timeout=1200)


def test_profile_and_group_max_age_the_shorter_applies():
    assert server_limits(P, ["lab"], "short").max_age == 7200  # profile only
    assert server_limits(P, ["acme"], "cpu").max_age == 8 * 3600  # group only
    p = policy(
        profiles={"cpu": {"session": {"max_age": "1h"}}},
        groups={
            "lab": {"kind": "research"},
            "acme": {"kind": "startup", "profiles": ["cpu"], "session": {"max_age": "8h"}},
        },
        gpu_types={},
    )
    assert server_limits(p, ["acme"], "cpu").max_age == 3600  # profile shorter than group
    p = policy(
        profiles={"cpu": {"session": {"max_age": "9h"}}},
        groups={
            "lab": {"kind": "research"},
            "acme": {"kind": "startup", "profiles": ["cpu"], "session": {"max_age": "8h"}},
        },
        gpu_types={},
    )
    assert server_limits(p, ["acme"], "cpu").max_age == 8 * 3600  # group shorter than profile


def test_group_limit_is_the_most_generous_of_the_groups_entitling_the_profile():
    assert server_limits(P, ["acme", "acme-long"], "gpu").max_age == 12 * 3600
    assert server_limits(P, ["acme", "acme-long"], "cpu").max_age == 8 * 3600  # only acme entitles cpu
    assert server_limits(P, ["acme", "lab"], "cpu").max_age is None  # lab has no session limit


def test_culling_disabled_keeps_session_limits_only():
    p = policy(culling={"enabled": False})
    assert server_limits(p, ["acme"], "gpu") == Limits(max_age=8 * 3600)
    assert needs_service(p)  # acme's session limit still needs the service
    p = policy(
        culling={"enabled": False},
        profiles={"cpu": {}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
    )
    assert not needs_service(p)


# -- hub models --------------------------------------------------------------------------------

USERS = [
    {
        "name": "ada",
        "groups": ["lab"],
        "servers": {
            "": {
                "name": "",
                "started": "2026-05-04T10:00:00.000000Z",
                "last_activity": "2026-05-04T10:20:00.000000Z",
                "pending": None,
                "ready": True,
                "user_options": {"profile": "cpu"},
                "state": {"profile": "gpu", "gpu_devices": ["GPU-1"], "pid": 42},
            }
        },
    },
    {
        "name": "bob",
        "groups": ["acme"],
        "servers": {
            "": {
                "name": "",
                "started": "2026-05-04T09:00:00Z",
                "last_activity": None,
                "pending": "spawn",
                "ready": False,
                "user_options": {},
            },
        },
    },
    {"name": "eve", "groups": ["lab"], "servers": {}},
]


def test_servers_of_hub_models():
    assert servers_of(P, USERS) == [
        Server("ada", "", "gpu", ("lab",), at(0), at(1200), ("GPU-1",), None),  # state wins over user_options
        Server("bob", "", "cpu", ("acme",), at(-3600), at(-3600), (), "spawn"),  # default profile, no activity
    ]


def test_servers_of_kubespawner_models():
    """On Kubernetes (KubeSpawner) the spawner state holds the pod, not the profile or GPU devices: the profile
    comes from user_options, and without devices there is no GPU-idle culling (nor any sampling)."""
    users = [
        {
            "name": "ada",
            "groups": ["lab"],
            "servers": {
                "": {
                    "name": "",
                    "started": "2026-05-04T10:00:00Z",
                    "last_activity": "2026-05-04T10:20:00Z",
                    "pending": None,
                    "user_options": {"profile": "gpu"},
                    "state": {
                        "pod_name": "jupyter-ada",
                        "namespace": "research",
                        "dns_name": "jupyter-ada.research.svc",
                    },
                }
            },
        }
    ]
    [s] = servers_of(P, users)
    assert s == Server("ada", "", "gpu", ("lab",), at(0), at(1200), (), None)
    limits = server_limits(P, s.groups, s.profile)
    assert limits.gpu_idle_timeout is not None  # the profile has one, but no device is ever sampled
    idle_since = update_gpu_idle({}, [s], {}, at(1200))
    assert idle_since == {}
    # past the GPU-idle timeout (20m), within the idle timeout (30m): nothing to do
    assert decide(P, [s], at(1200 + 1500), gpu_idle_since=idle_since) == []
    # a server started with the default profile has no user_options["profile"]: the user's first profile
    users[0]["servers"][""]["user_options"] = {}
    assert servers_of(P, users)[0].profile == P.profiles_for(["lab"])[0]


def test_no_gpu_source_without_the_embedded_runtime(tmp_path):
    """The sessions pod on Kubernetes has no runtime.json (no GPUs listed) and no NVML: no GPU source."""
    assert choose_source({}, ".", None) is None


def test_server_key_changes_with_a_restart():
    assert server(started=0).key == "ada/@2026-05-04T10:00:00Z"
    assert server(started=5).key != server(started=0).key


# -- idle culling ------------------------------------------------------------------------------


def test_cpu_and_gpu_servers_are_culled_at_their_own_idle_limits():
    servers = [server(user="ada", profile="cpu"), server(user="bob", profile="gpu", gpus=["G0"])]
    assert decide(P, servers, at(1799)) == []
    [gpu_stop] = decide(P, servers, at(1800))
    assert (gpu_stop.kind, gpu_stop.user, gpu_stop.reason) == ("stop", "bob", "idle")
    assert "30m" in gpu_stop.message
    assert [(a.user, a.reason) for a in decide(P, servers, at(3600))] == [("ada", "idle"), ("bob", "idle")]


def test_recent_activity_keeps_a_server():
    assert decide(P, [server(active=3000)], at(3600 + 2999)) == []
    assert [a.reason for a in decide(P, [server(active=3000)], at(3000 + 3600))] == ["idle"]


def test_pending_servers_are_left_alone():
    assert decide(P, [server(pending="spawn"), server(user="bob", pending="stop")], at(99999)) == []


def test_culling_disabled_never_culls_idle():
    assert decide(policy(culling={"enabled": False}), [server()], at(99999)) == []


# -- GPU idleness ------------------------------------------------------------------------------


def test_gpus_idle_needs_every_device_known_and_below_threshold():
    assert gpus_idle(["a", "b"], {"a": 0, "b": 4.9}, 5)
    assert not gpus_idle(["a", "b"], {"a": 0, "b": 5}, 5)
    assert not gpus_idle(["a", "b"], {"a": 0}, 5)  # unknown counts as busy
    assert not gpus_idle([], {}, 5)


def test_update_gpu_idle_tracks_idle_stretches():
    s = server(profile="gpu", gpus=["G0"])
    h = update_gpu_idle({}, [s], {"G0": 0}, at(10))
    assert h == {s.key: at(10)}
    h = update_gpu_idle(h, [s], {"G0": 1}, at(20))
    assert h == {s.key: at(10)}  # still idle: the stretch goes on
    assert update_gpu_idle(h, [s], {"G0": 80}, at(30)) == {}  # busy: reset
    assert update_gpu_idle(h, [s], {}, at(30)) == {}  # unknown: reset
    assert update_gpu_idle(h, [], {"G0": 0}, at(30)) == {}  # gone: dropped
    assert update_gpu_idle({}, [server()], {"G0": 0}, at(10)) == {}  # CPU server: never


def test_gpu_idle_server_is_culled_although_active():
    s = server(profile="gpu", gpus=["G0"], active=5000)  # the browser keeps it active
    idle_since = {s.key: at(4000)}
    assert decide(P, [s], at(4000 + 1199), gpu_idle_since=idle_since) == []
    [a] = decide(P, [s], at(4000 + 1200), gpu_idle_since=idle_since)
    assert (a.kind, a.reason, a.level) == ("stop", "gpu_idle", "info")
    assert "GPUs were idle for 20m" in a.message
    assert decide(P, [s], at(4000 + 1200), gpu_idle_since={}) == []  # busy GPUs: kept


# -- session limits and warnings ---------------------------------------------------------------


def test_session_limit_warnings_then_stop():
    s = server(user="sam", profile="cpu", groups=["acme"], active=10**6)  # max_age 8h, always active
    end = 8 * 3600
    assert decide(P, [s], at(end - 15 * 60 - 1)) == []
    [w] = decide(P, [s], at(end - 15 * 60))
    assert (w.kind, w.reason, w.level, w.lead, w.covers) == ("warn", "max_age", "warning", 900, (900,))
    assert w.message == (
        "Your server (cpu) will be stopped in 15m, at 2026-05-04T18:00:00Z: its session limit is 8h. "
        "Save your work; your Dask clusters stop with it."
    )
    assert w.notification(at(end - 900)) == {
        "level": "warning",
        "source": "sessions",
        "message": w.message,
        "at": "2026-05-04T17:45:00Z",
        "server": "",
    }
    assert decide(P, [s], at(end - 600), warned={(s.key, 900)}) == []  # given once
    [w5] = decide(P, [s], at(end - 300), warned={(s.key, 900)})
    assert (w5.level, w5.lead) == ("critical", 300)
    [stop] = decide(P, [s], at(end), warned={(s.key, 900), (s.key, 300)})
    assert (stop.kind, stop.reason) == ("stop", "max_age")
    assert "session limit of 8h" in stop.message


def test_warnings_due_together_give_one():
    s = server(profile="short", active=10**6)  # 2h
    [w] = decide(P, [s], at(7200 - 120))
    assert (w.lead, w.covers, w.level) == (300, (300, 900), "critical")
    assert "in 2m" in w.message


def test_a_short_session_is_warned_at_once_and_stopped_on_time():
    p = policy(
        profiles={"cpu": {"session": {"max_age": "20s"}}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
        culling={"warn_before": ["10s"]},
    )
    s = server(active=10**6)
    assert decide(p, [s], at(9)) == []
    assert [a.kind for a in decide(p, [s], at(10))] == ["warn"]
    assert [a.kind for a in decide(p, [s], at(20), warned={(s.key, 10)})] == ["stop"]
    # a stop is never accompanied by a warning
    assert [a.kind for a in decide(p, [s], at(25))] == ["stop"]


def test_session_limit_wins_over_idle():
    s = server(profile="cpu", groups=["acme"])
    [a] = decide(P, [s], at(9 * 3600))
    assert a.reason == "max_age"


def test_named_server_messages():
    [a] = decide(P, [server(name="gpu1", profile="gpu")], at(1800))
    assert a.message.startswith("Your server 'gpu1' (gpu) was stopped")
    assert a.notification(at(1800))["server"] == "gpu1"


def test_next_due():
    s = server(user="sam", profile="cpu", groups=["acme"], active=0)
    assert next_due(P, [s], at(0)) == at(3600)  # idle first
    assert next_due(P, [s], at(3600)) == at(8 * 3600 - 900)
    assert next_due(P, [s], at(8 * 3600 - 900), warned={(s.key, 900)}) == at(8 * 3600 - 300)
    g = server(profile="gpu", gpus=["G0"], active=10**6)
    assert next_due(P, [g], at(100), gpu_idle_since={g.key: at(50)}) == at(1250)
    assert next_due(P, [], at(0)) is None


def test_human():
    assert [human(x) for x in (20, 60, 90, 900, 5400, 8 * 3600, 86400 + 3600)] == [
        "20s",
        "1m",
        "1m 30s",
        "15m",
        "1h 30m",
        "8h",
        "1d 1h",
    ]


# -- the service's memory (no hub: a fake client) ----------------------------------------------


class FakeHub:
    def __init__(self, users):
        self.users = users
        self.stopped = []

    async def active_users(self):
        return self.users

    async def stop_server(self, user, server):
        self.stopped.append((user, server))


def test_service_warns_once_stops_once_and_keeps_notifications_per_user():
    p = policy(
        profiles={"cpu": {"session": {"max_age": "20s"}}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
        culling={"warn_before": ["10s"]},
    )
    users = [
        {
            "name": "ada",
            "groups": ["lab"],
            "servers": {
                "": {
                    "started": "2026-05-04T10:00:00Z",
                    "last_activity": "2026-05-04T10:00:00Z",
                    "state": {"profile": "cpu"},
                }
            },
        }
    ]
    now = [at(12)]
    hub = FakeHub(users)
    svc = SessionsService(p, hub, clock=lambda: now[0])
    assert [a.kind for a in asyncio.run(svc.check())] == ["warn"]
    assert asyncio.run(svc.check()) == []  # not twice
    assert svc.delay(60) == pytest.approx(8.2)
    now[0] = at(20)
    assert [a.kind for a in asyncio.run(svc.check())] == ["stop"]
    assert asyncio.run(svc.check()) == []  # stopping: asked once
    assert hub.stopped == [("ada", "")]
    notes = svc.notifications("ada")
    assert [(n["level"], n["source"], n["server"], n["at"]) for n in notes] == [
        ("critical", "sessions", "", "2026-05-04T10:00:12Z"),
        ("info", "sessions", "", "2026-05-04T10:00:20Z"),
    ]
    assert svc.notifications("bob") == []
    now[0] = at(20 + 86401)
    assert svc.notifications("ada") == []  # expired


def test_service_samples_gpus_of_its_servers(tmp_path):
    util = tmp_path / "u.json"
    util.write_text(json.dumps({"G0": 0, "G9": 0}))
    users = [
        {
            "name": "ada",
            "groups": ["lab"],
            "servers": {
                "": {
                    "started": "2026-05-04T10:00:00Z",
                    "last_activity": "2026-05-04T12:00:00Z",
                    "state": {"profile": "gpu", "gpu_devices": ["G0"]},
                }
            },
        }
    ]
    now = [at(3600)]
    svc = SessionsService(P, FakeHub(users), FileUtilisation(util), clock=lambda: now[0])
    assert asyncio.run(svc.check()) == []
    now[0] = at(3600 + 1200)
    [a] = asyncio.run(svc.check())
    assert a.reason == "gpu_idle"


# -- utilisation sources -----------------------------------------------------------------------


def test_file_utilisation(tmp_path):
    f = tmp_path / "u.json"
    src = FileUtilisation(f)
    assert isinstance(src, GpuUtilisation)
    assert src.utilisation(["a"]) == {}  # no file: unknown
    f.write_text(json.dumps({"a": 12, "b": "x", "c": True, "d": 0.5}))
    assert src.utilisation(["a", "b", "c", "d", "e"]) == {"a": 12.0, "d": 0.5}
    f.write_text("{not json")
    assert src.utilisation(["a"]) == {}


def test_choose_source(tmp_path):
    assert choose_source({}, tmp_path) is None
    fake = choose_source({"h100": ["FAKE-h100-0"]}, tmp_path)
    assert isinstance(fake, FileUtilisation) and fake.path == Path(tmp_path, "fake-gpu-utilisation.json")
    assert choose_source({}, tmp_path, tmp_path / "x.json").path == tmp_path / "x.json"


# -- wiring into the hub -----------------------------------------------------------------------

RUNTIME = Runtime(
    config="/p.yaml", state_dir="/s", hub_config_dir="/h", venv_bin="/v/bin", proxy_command="chp", sessions_port=18015
)
SECRETS = {"gateway_api_token": "g", "sessions_api_token": "sessions-token"}


def test_sessions_service_replaces_the_idle_culler():
    svcs = services(P, RUNTIME, SECRETS)
    assert [s["name"] for s in svcs] == ["dask-gateway-server", "dask-gateway", "sessions"]
    assert svcs[-1] == {
        "name": "sessions",
        "url": "http://127.0.0.1:18015",
        "api_token": "sessions-token",
        "command": ["/v/bin/python", "-m", "workbench.services.sessions", "--interval=60"],
        "cwd": "/s",
        "environment": {"WORKBENCH_RUNTIME": "/s/runtime.json"},
    }
    assert "sessions_api_token" in SECRET_NAMES


def test_sessions_service_port_is_picked_when_the_runtime_has_none():
    rt = Runtime(config="/p.yaml", state_dir="/s", hub_config_dir="/h", venv_bin="/v/bin", proxy_command="chp")
    url = services(P, rt, SECRETS)[-1]["url"]
    assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0


def test_sessions_roles_have_exactly_the_scopes_needed():
    by_name = {r["name"]: r for r in roles(P)}
    assert by_name["workbench-sessions"] == {
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
    }
    assert by_name["workbench-sessions-users"]["scopes"] == ["access:services!service=sessions"]
    assert by_name["workbench-sessions-users"]["groups"] == ["lab", "acme", "acme-long"]
    assert "idle-culler" not in by_name


def test_no_sessions_service_without_anything_to_enforce():
    p = policy(
        culling={"enabled": False},
        profiles={"cpu": {}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
    )
    assert [s["name"] for s in services(p, RUNTIME, SECRETS)] == ["dask-gateway-server", "dask-gateway"]
    assert not {"workbench-sessions", "workbench-sessions-users"} & {r["name"] for r in roles(p)}


# -- policy validation -------------------------------------------------------------------------


def problems(**over) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        policy(**over)
    return info.value.problems


def test_durations_in_seconds_are_accepted():
    p = policy(
        profiles={"cpu": {"session": {"max_age": "20s"}, "idle_timeout": "45s"}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
        culling={"every": "2s", "warn_before": ["10s"]},
    )
    assert (p.profiles["cpu"].session.max_age, p.profiles["cpu"].idle_timeout) == (20, 45)
    assert (p.culling.every, p.culling.warn_before) == (2, [10])
    assert policy().culling.warn_before == [900, 300]
    assert Culling().warn_before == [900, 300]


def test_gpu_idle_timeout_needs_a_gpu_profile():
    assert problems(
        profiles={"cpu": {"gpu_idle_timeout": "10m"}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
    ) == [
        (
            "profiles.cpu.gpu_idle_timeout",
            "only profiles with a 'gpu' have GPUs to watch; remove it or use idle_timeout",
        )
    ]


def test_zero_limits_are_refused_with_the_fix():
    got = problems(
        profiles={
            "cpu": {"session": {"max_age": 0}, "idle_timeout": "0s"},
            "gpu": {"gpu": {"type": "h100"}, "gpu_idle_timeout": 0},
        },
        groups={"lab": {"kind": "research", "profiles": ["cpu", "gpu"]}},
        culling={"every": 0, "timeout": 0, "warn_before": ["5m", "0s", "300"]},
    )
    assert got == [
        ("profiles.cpu.session.max_age", "must be more than 0 (like 8h); remove 'session' for no limit"),
        ("profiles.cpu.idle_timeout", "must be more than 0 (like 30m); remove it to use culling.timeout"),
        (
            "profiles.gpu.gpu_idle_timeout",
            "must be more than 0 (like 20m); remove it to never stop servers for idle GPUs",
        ),
        ("culling.every", "must be more than 0 (like 5m): how often servers are checked"),
        ("culling.timeout", "must be more than 0 (like 1h); use 'enabled: false' to never stop idle servers"),
        ("culling.warn_before[1]", "must be more than 0 (like 15m): how long before a session limit users are warned"),
        ("culling.warn_before[2]", "300s is listed twice; list each warning once"),
    ]


def test_bad_durations_name_the_field():
    got = problems(
        profiles={"cpu": {"idle_timeout": "soon", "session": {"max_age": "8 hours"}}},
        gpu_types={},
        groups={"lab": {"kind": "research", "profiles": ["cpu"]}},
        culling={"warn_before": ["x"]},
    )
    paths = [path for path, _ in got]
    assert paths == ["culling.warn_before[0]", "profiles.cpu.session.max_age", "profiles.cpu.idle_timeout"]
    assert all("expected a duration like 90, 30s, 15m, 8h or 2d" in msg for _, msg in got)


def test_unknown_profile_key_is_still_refused():
    got = problems(
        profiles={"cpu": {"idle_timout": "5m"}}, gpu_types={}, groups={"lab": {"kind": "research", "profiles": ["cpu"]}}
    )
    assert got == [("profiles.cpu.idle_timout", "unknown key; remove it or check its spelling")]
