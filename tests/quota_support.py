"""Shared by the quota tests and benchmark: a policy with budgets and caps, a settable clock, event makers."""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

from workbench.policy import parse_policy
from workbench.services.quota.models import AdmitRequest, RunningItem, UsageEvent

UTC = UTC
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "hub_config" / "demo.yaml"


def t(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def quota_policy_data() -> dict:
    """The demo policy with per-user budgets and concurrency caps added (a dict, for YAML files too)."""
    data = yaml.safe_load(DEMO.read_text())
    groups = data["groups"]
    groups["physics-lab"]["budget"] = {
        "gpu_hours": 500,
        "cpu_hours": 20000,
        "period": "month",
        "per_user": {"gpu_hours": 300},
    }
    groups["physics-lab"]["caps"] = {"running_gpus": 5, "user_running_servers": 1}
    groups["course-ml101"]["budget"] = {"cpu_hours": 1000, "period": "term", "term_starts": ["02-01", "09-01"]}
    groups["course-ml101"]["caps"] = {"running_servers": 5}
    groups["startup-acme"]["budget"] = {"gpu_hours": 100, "period": "total"}
    return data


POLICY = parse_policy(quota_policy_data())


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def start(
    item: str, user="researcher", group="physics-lab", kind="dask-worker", id=None, time=None, **res
) -> UsageEvent:
    res.setdefault("cpu", 1.0)
    res.setdefault("memory", 2 * 10**9)
    return UsageEvent(
        id=id or f"start-{uuid.uuid4().hex}",
        type="start",
        item=item,
        kind=kind,
        user=user,
        group=group,
        time=time,
        **res,
    )


def stop(item: str, id=None, time=None) -> UsageEvent:
    return UsageEvent(id=id or f"stop-{uuid.uuid4().hex}", type="stop", item=item, time=time)


def admit_request(item: str, kind="dask-worker", **res) -> AdmitRequest:
    return AdmitRequest(item=item, kind=kind, **res)


def running(item: str, user="researcher", group="physics-lab", kind="server", started=None, **res) -> RunningItem:
    if not res:
        res = {"profile": "cpu-large"}
    return RunningItem(item=item, kind=kind, user=user, group=group, started=started, **res)


def postgres_url() -> str | None:
    """A PostgreSQL server URL for tests: $WORKBENCH_TEST_POSTGRES_URL, else scripts/postgres-up.sh (as root)."""
    url = os.environ.get("WORKBENCH_TEST_POSTGRES_URL")
    if url:
        return url
    if os.geteuid() != 0:
        return None
    out = subprocess.run([str(REPO / "scripts" / "postgres-up.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/postgres-up.sh failed ({out.returncode}):\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def fresh_postgres_database(url: str) -> tuple[str, callable]:
    """A new, empty database on the server of ``url``; returns its URL and a function that drops it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from workbench.services.quota.ledger import normalize_db_url

    base = make_url(normalize_db_url(url))
    name = f"wbq_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as c:
            c.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return base.set(database=name).render_as_string(hide_password=False), drop


def database_url(kind: str, tmp_path: Path) -> tuple[str, callable]:
    """A ledger database for a test: ``"sqlite"`` (a file in ``tmp_path``) or ``"postgresql"`` (a fresh database
    on the server of :func:`postgres_url`; the test is skipped where there is none). Returns the URL and the
    function that drops it."""
    if kind == "sqlite":
        from workbench.services.quota.ledger import default_db_url

        return default_db_url(tmp_path), lambda: None
    base = postgres_url()
    if base is None:
        import pytest

        pytest.skip("no PostgreSQL: run as root (scripts/postgres-up.sh) or set WORKBENCH_TEST_POSTGRES_URL")
    return fresh_postgres_database(base)
