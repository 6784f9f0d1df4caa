"""Shared fixtures of the integration suite (real processes, nothing mocked).

Fixtures
--------
``demo_wb`` (session)
    One real embedded workbench (`workbench up` with ``hub_config/demo.yaml``, no extra options, per-user
    Unix accounts required: see :mod:`tests.integration.harness`), started once for every module that
    runs on the default policy (test_embedded, test_courses, test_gateway, test_profiles) instead of one
    copy per module. At the end of the session it must stop with exit code 0 and leave no process behind.
``default_wb`` (function)
    ``demo_wb`` for one test, which must leave it as it found it: after the test no user may still have a
    server (the hub's API, with an admin token) or a Dask scheduler process (any user's cluster), so
    that a test which forgets to clean up fails itself instead of disturbing the next module.
``admin_token`` (session)
    An API token of the demo admin (hub admin) on ``demo_wb``.

``demo_gpus_wb`` (session, in tests/conftest.py because tests/browser uses it too)
    The demo policy plus one-member budget groups, with pretend GPUs: test_profiles (GPU devices),
    test_lab_notifications, test_embedded (a group without a dask policy), the notifications browser test.

Modules that need another policy or other options (quota, sessions, Slurm, OIDC, course material, rosters)
start their own :class:`~tests.integration.harness.Workbench` in a module fixture.
"""

from __future__ import annotations

import time

import psutil
import pytest

from .harness import Workbench, state_dir


@pytest.fixture(scope="session")
def demo_wb():
    w = Workbench(state_dir()).start()
    try:
        yield w
    finally:
        code = w.stop()
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()


@pytest.fixture(scope="session")
def admin_token(demo_wb):
    return demo_wb.new_token(demo_wb.login("admin"), "admin")


def _busy(w: Workbench, token: str) -> list[str]:
    """Servers still known to the hub (pending or running, as an admin sees them) and live Dask schedulers."""
    users = w.token_api(token, "GET", "/users", params={"state": "active"}).json()
    busy = [f"server of {u['name']}" for u in users if u.get("servers")]
    for p in w.snapshot():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "scheduler" in cmd and "dask" in cmd:
            busy.append(f"Dask scheduler {p.pid}: {cmd[:100]}")
    return busy


@pytest.fixture
def default_wb(demo_wb, admin_token):
    yield demo_wb
    # servers being stopped by the test's last call may still be on their way down: wait for that, then
    # assert (a test that left one running fails here, naming it)
    deadline = time.monotonic() + 60
    left = _busy(demo_wb, admin_token)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _busy(demo_wb, admin_token)
    assert not left, f"the test left these running on the shared workbench: {left}"
