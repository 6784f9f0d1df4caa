"""Notifications in JupyterLab end to end: the server extension `workbench.lab` in a real single-user server.

A real embedded workbench (hub, proxy, quota and sessions services, a real JupyterLab server of the
user). The group's earlier usage is written to the quota ledger with the gateway's service token, as
the gateway would send it (see test_quota_enforcement). The user's browser-side endpoint
``/user/<name>/workbench/notifications`` is asked through the proxy with the user's hub token; the
server asks the services with its own token and merges their answers.
"""

from __future__ import annotations

import pytest
import requests

from .test_quota_enforcement import Users, wait_for

pytestmark = pytest.mark.integration
USER, GROUP = "noted", "lab-noted"


@pytest.fixture(scope="module")
def wb(demo_gpus_wb):
    """The shared workbench (demo policy, pretend GPUs) with a budget group for USER (tests/conftest.py)."""
    return demo_gpus_wb


def test_a_budget_past_80_percent_reaches_the_users_jupyterlab_server(wb):
    users = Users(wb)
    token = users.token(USER)
    wb.start_server(token, USER, profile="cpu-small")
    url = f"{wb.url}/user/{USER}/workbench/notifications"
    try:
        # not logged in: jupyter_server's own auth refuses
        anonymous = requests.get(url, allow_redirects=False, timeout=30)
        assert anonymous.status_code in (302, 401, 403), anonymous.text
        before = requests.get(url, headers={"Authorization": f"token {token}"}, timeout=30)
        assert before.status_code == 200, before.text
        assert before.json()["notifications"] == []
        assert before.json()["problems"] == []  # both services answered the server's token

        users.spend(GROUP, USER, cpu=510)  # 8.5 of 10 CPU-hours

        def warned() -> dict | None:
            doc = requests.get(url, headers={"Authorization": f"token {token}"}, timeout=30).json()
            return doc if doc["notifications"] else None

        # the server caches its answer for a few seconds (WorkbenchNotifications.cache_seconds)
        doc = wait_for(warned, 60, "the quota warning", every=2)
        assert doc["problems"] == []
        [note] = doc["notifications"]
        assert (note["source"], note["level"], note["group"], note["resource"]) == ("quota", "warning", GROUP, "cpu")
        assert "8.5 of 10 CPU-hours used this month (85%)" in note["message"], note["message"]
        assert note["id"] == f"quota:{GROUP}:cpu:warning:"
    finally:
        wb.stop_server(token, USER)
