"""workbench.lab: merging the services' notifications (pure) and asking them (in-process services)."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime

from tornado import web

from workbench.lab import (
    SourceAnswer,
    WorkbenchNotifications,
    merge_notifications,
    notification_id,
    parse_answer,
    services_base_url,
)

NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


def quota(level: str, fraction: float, group: str = "physics-lab", resource: str = "cpu", stops_at=None) -> dict:
    return {
        "level": level,
        "source": "quota",
        "message": f"{resource} budget of group {group}: {fraction:.0%}",
        "at": "2026-05-04T10:00:00Z",
        "group": group,
        "resource": resource,
        "fraction": fraction,
        "stops_at": stops_at,
    }


def session(level: str, at: str, message: str = "your session ends at 18:00 UTC") -> dict:
    return {"level": level, "source": "sessions", "message": message, "at": at, "server": ""}


def test_merge_puts_the_most_severe_first_then_the_fullest_budget_then_the_newest():
    doc = merge_notifications(
        [
            SourceAnswer(
                "quota",
                [
                    quota("warning", 0.82),
                    quota("critical", 1.2, resource="gpu"),
                    quota("warning", 0.9, group="course-ml101"),
                ],
            ),
            SourceAnswer(
                "sessions",
                [
                    session("info", "2026-05-04T09:00:00Z", "older"),
                    session("warning", "2026-05-04T09:30:00Z"),
                    session("info", "2026-05-04T09:50:00Z", "newer"),
                ],
            ),
        ],
        as_of=NOW,
    )
    got = [(n["source"], n["level"], n.get("fraction"), n["message"]) for n in doc["notifications"]]
    assert got == [
        ("quota", "critical", 1.2, "gpu budget of group physics-lab: 120%"),
        ("quota", "warning", 0.9, "cpu budget of group course-ml101: 90%"),
        ("quota", "warning", 0.82, "cpu budget of group physics-lab: 82%"),
        ("sessions", "warning", None, "your session ends at 18:00 UTC"),
        ("sessions", "info", None, "newer"),
        ("sessions", "info", None, "older"),
    ]
    assert doc["problems"] == []
    assert doc["as_of"] == "2026-05-04T10:00:00Z"


def test_a_service_with_a_problem_is_reported_and_the_others_still_count():
    doc = merge_notifications(
        [
            SourceAnswer("quota", problem="not reachable: connection refused"),
            SourceAnswer("sessions", [session("warning", "2026-05-04T09:30:00Z")]),
        ],
        as_of=NOW,
    )
    assert doc["problems"] == [{"source": "quota", "message": "not reachable: connection refused"}]
    assert [n["source"] for n in doc["notifications"]] == ["sessions"]


def test_malformed_entries_are_dropped_unknown_levels_are_info_and_the_source_is_filled_in():
    doc = merge_notifications(
        [
            SourceAnswer(
                "sessions",
                [
                    "not an object",
                    {"level": "warning"},
                    {"level": "warning", "message": "  "},
                    {"level": "PANIC", "message": "odd level", "at": "yesterday"},
                    {"level": "Warning", "message": "no source given", "at": "2026-05-04T09:00:00Z"},
                ],
            )
        ],
        as_of=NOW,
    )
    assert [(n["level"], n["source"], n["message"]) for n in doc["notifications"]] == [
        ("warning", "sessions", "no source given"),
        ("info", "sessions", "odd level"),
    ]


def test_ids_stay_while_a_quota_notification_says_the_same_and_change_when_it_escalates():
    a = quota("warning", 0.81)
    grown = {**quota("warning", 0.86), "at": "2026-05-04T10:05:00Z"}  # figures and time of the request change
    assert notification_id(a) == notification_id(grown) == "quota:physics-lab:cpu:warning:"
    assert notification_id(quota("critical", 0.96)) != notification_id(a)
    assert notification_id(quota("critical", 1.1, stops_at="2026-05-04T10:15:00Z")) != notification_id(
        quota("critical", 1.1)
    )
    # events: their time and text
    s1, s2 = session("warning", "2026-05-04T09:00:00Z"), session("warning", "2026-05-04T09:10:00Z")
    assert notification_id(s1) == notification_id(dict(s1)) != notification_id(s2)
    assert notification_id(s1) != notification_id({**s1, "message": "other"})


def test_the_same_notification_twice_is_listed_once():
    doc = merge_notifications([SourceAnswer("quota", [quota("warning", 0.81), quota("warning", 0.81)])], as_of=NOW)
    assert len(doc["notifications"]) == 1 and doc["notifications"][0]["id"] == "quota:physics-lab:cpu:warning:"


def test_parse_answer():
    ok = parse_answer("quota", 200, json.dumps({"user": "u", "notifications": [quota("warning", 0.8)]}).encode())
    assert ok.problem is None and len(ok.notifications) == 1
    assert parse_answer("quota", 403, b'{"status": 403, "message": "this token lacks the scope x"}').problem == (
        "answered 403: this token lacks the scope x"
    )
    assert parse_answer("quota", 404, b"").problem == "answered 404"
    assert parse_answer("quota", 200, b"<html>").problem == "answered something that is not JSON"
    assert parse_answer("quota", 200, b'{"items": []}').problem == "answered JSON without a 'notifications' list"


def test_services_base_url_from_the_environment():
    assert services_base_url({"WORKBENCH_SERVICES_URL": "http://proxy:8000/jh/services"}) == (
        "http://proxy:8000/jh/services/"
    )
    assert (
        services_base_url(
            {"JUPYTERHUB_PUBLIC_URL": "https://wb.example.edu/jh/user/ana/", "JUPYTERHUB_BASE_URL": "/jh/"}
        )
        == "https://wb.example.edu/jh/services/"
    )
    assert services_base_url(
        {
            "JUPYTERHUB_PUBLIC_URL": "",
            "JUPYTERHUB_BASE_URL": "/",
            "DASK_GATEWAY__ADDRESS": "http://127.0.0.1:8000/services/dask-gateway",
        }
    ) == ("http://127.0.0.1:8000/services/")
    assert services_base_url({"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api"}) == ""


# ---------------------------------------------------------------------------
# asking real (in-process) services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_services(calls: list[str], released: asyncio.Event | None = None) -> tuple[web.Application, int]:
    """Stand-ins of the quota service (answers at once) and of a service that never answers until
    ``released`` is set (it outlasts any timeout, however loaded the machine)."""

    class Quota(web.RequestHandler):
        def get(self):
            calls.append(self.request.headers.get("Authorization", ""))
            self.finish({"user": "ana", "notifications": [quota("warning", 0.85)]})

    class Slow(web.RequestHandler):
        async def get(self):
            if released is not None:
                await released.wait()
            self.finish({"notifications": []})

    app = web.Application([(r"/services/quota/api/notifications", Quota), (r"/services/slow/api/notifications", Slow)])
    port = free_port()
    return app, port


def test_asking_the_services_tolerates_absent_and_slow_ones_and_caches():
    async def main():
        calls: list[str] = []
        released = asyncio.Event()
        app, port = run_services(calls, released)
        server = app.listen(port, address="127.0.0.1")
        try:
            n = WorkbenchNotifications(
                services_url=f"http://127.0.0.1:{port}/services",
                token="secret-token",
                timeout=2,  # the stand-in that answers does so in milliseconds; "slow" never does
                cache_seconds=60,
                sources={"quota": "api/notifications", "sessions": "api/notifications", "slow": "api/notifications"},
            )
            first, second = await asyncio.gather(n.get(), n.get())
            return calls, first, second
        finally:
            released.set()
            server.stop()

    calls, first, second = asyncio.run(main())
    assert calls == ["token secret-token"]  # the server's token; both callers shared one ask
    assert first is second
    assert [(x["source"], x["level"]) for x in first["notifications"]] == [("quota", "warning")]
    problems = {p["source"]: p["message"] for p in first["problems"]}
    assert problems["sessions"].startswith("answered 404")
    assert problems["slow"].startswith("not reachable: ") and "imeout" in problems["slow"]


def test_without_a_hub_token_every_service_is_a_problem():
    n = WorkbenchNotifications(token="", services_url="http://127.0.0.1:9/services")
    doc = asyncio.run(n.get())
    assert doc["notifications"] == []
    assert {p["source"] for p in doc["problems"]} == {"quota", "sessions"}
    assert all("does not run under JupyterHub" in p["message"] for p in doc["problems"])


def test_a_refused_connection_is_a_problem():
    n = WorkbenchNotifications(token="t", services_url=f"http://127.0.0.1:{free_port()}/services", timeout=1)
    doc = asyncio.run(n.get())
    assert {p["source"] for p in doc["problems"]} == {"quota", "sessions"}
    assert all(p["message"].startswith("not reachable: ") for p in doc["problems"])
