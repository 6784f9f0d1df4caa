"""The sessions service's own record of its checks (``api/status`` for hub admins, counters in ``api/health``).

Tests wait on these instead of sleeping: e.g. "the server with busy GPUs was checked past its gpu_idle_timeout
and kept". The hub is a stand-in here (:class:`FakeHub`, no HTTP); the real service is exercised in
tests/integration/test_sessions.py.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from tornado import httpclient

from workbench.gpu_utilisation import FileUtilisation
from workbench.services.sessions.app import SessionsService

from .test_sessions import FakeHub, P, at


def gpu_user(started="2026-05-04T10:00:00Z"):
    return {
        "name": "ada",
        "groups": ["lab"],
        "servers": {
            "": {
                "started": started,
                "last_activity": "2026-05-04T12:00:00Z",
                "state": {"profile": "gpu", "gpu_devices": ["G0"]},
            }
        },
    }


def test_status_counts_checks_and_records_each_server(tmp_path):
    util = tmp_path / "u.json"
    util.write_text(json.dumps({"G0": 90}))
    now = [at(3600)]
    svc = SessionsService(P, FakeHub([gpu_user()]), FileUtilisation(util), clock=lambda: now[0])
    assert svc.status() == {
        "checks": 0,
        "failed_checks": 0,
        "last_check": None,
        "last_error": None,
        "servers": {},
    }
    asyncio.run(svc.check())
    now[0] = at(3600 + 1500)  # past the 20 min gpu_idle_timeout, GPUs busy: kept
    assert asyncio.run(svc.check()) == []
    status = svc.status()
    assert (status["checks"], status["last_check"]) == (2, "2026-05-04T11:25:00Z")
    assert status["servers"] == {
        "ada/": {
            "user": "ada",
            "server": "",
            "profile": "gpu",
            "started": "2026-05-04T10:00:00Z",
            "first_checked": "2026-05-04T11:00:00Z",
            "last_checked": "2026-05-04T11:25:00Z",
            "checks": 2,
            "gpu_utilisation": {"G0": 90.0},
            "gpu_idle_since": None,
            "last_action": None,
        }
    }
    # idle GPUs: the stretch starts at the first idle sample, the stop is recorded
    util.write_text(json.dumps({"G0": 0}))
    now[0] = at(3600 + 1560)
    asyncio.run(svc.check())
    assert svc.status()["servers"]["ada/"]["gpu_idle_since"] == "2026-05-04T11:26:00Z"
    now[0] = at(3600 + 1560 + 1200)
    [stop] = asyncio.run(svc.check())
    assert stop.kind == "stop"
    assert svc.status()["servers"]["ada/"]["last_action"] == "stop"
    # a restart of the server is a new run: checked afresh
    svc.hub.users = [gpu_user(started="2026-05-04T11:00:00Z")]
    now[0] = at(3600 + 3000)
    asyncio.run(svc.check())
    server = svc.status()["servers"]["ada/"]
    assert (server["checks"], server["first_checked"], server["last_action"]) == (1, "2026-05-04T11:50:00Z", None)
    # gone: no longer listed
    svc.hub.users = []
    asyncio.run(svc.check())
    assert svc.status()["servers"] == {} and svc.status()["checks"] == 6


class BrokenHub(FakeHub):
    async def active_users(self):
        raise ConnectionRefusedError("the hub is restarting")


def test_failed_checks_are_counted_with_the_error():
    svc = SessionsService(P, BrokenHub([]), clock=lambda: at(0))

    async def two_rounds():
        task = asyncio.ensure_future(svc.run(0.01))
        while svc.failed_checks < 2:  # the loop's own counter, no sleeping on a guess
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(asyncio.wait_for(two_rounds(), 60))
    assert svc.checks == 0 and svc.last_error == "the hub is restarting"
    assert svc.counters()["failed_checks"] >= 2


class FakeHubAuth:
    """A stand-in for HubAuth: the token is the user's name; admins are named admin*."""

    def get_token(self, handler, in_cookie=True):
        return (handler.request.headers.get("Authorization") or "").removeprefix("token ") or None

    async def user_for_token(self, token, sync=True, **kw):
        return {"kind": "user", "name": token, "admin": token.startswith("admin"), "scopes": ["access:services"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("token", "code", "says"),
    [
        (None, 401, "authenticate with a JupyterHub token"),
        ("ada", 403, "the sessions status is for hub admins: use an admin's token"),
        ("admin", 200, '"checks": 1'),
    ],
)
def test_status_is_for_admins_only(token, code, says):
    async def main():
        svc = SessionsService(P, FakeHub([gpu_user()]), clock=lambda: at(3600))
        await svc.check()
        port = free_port()
        server = svc.make_app(FakeHubAuth(), "/services/sessions/").listen(port, address="127.0.0.1")
        try:
            headers = {"Authorization": f"token {token}"} if token else {}
            r = await httpclient.AsyncHTTPClient().fetch(
                f"http://127.0.0.1:{port}/services/sessions/api/status", headers=headers, raise_error=False
            )
            return r.code, r.body.decode()
        finally:
            server.stop()

    got, body = asyncio.run(main())
    assert got == code, body
    assert says in body, body


def test_health_shows_the_counters_with_a_valid_token():
    async def main():
        svc = SessionsService(P, FakeHub([]), clock=lambda: at(0))
        await svc.check()
        port = free_port()
        server = svc.make_app(FakeHubAuth(), "/services/sessions/").listen(port, address="127.0.0.1")
        client = httpclient.AsyncHTTPClient()
        url = f"http://127.0.0.1:{port}/services/sessions/api/health"
        try:
            anonymous = await client.fetch(url)
            known = await client.fetch(url, headers={"Authorization": "token ada"})
            return json.loads(anonymous.body), json.loads(known.body)
        finally:
            server.stop()

    anonymous, known = asyncio.run(main())
    assert anonymous == {"status": "ok"}
    assert known == {
        "status": "ok",
        "checks": 1,
        "failed_checks": 0,
        "last_check": "2026-05-04T10:00:00Z",
        "last_error": None,
    }
