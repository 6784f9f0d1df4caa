"""The ledger migrates databases made by older versions at start: a quota_usage table written here by hand the way
the schema was before notebook jobs (kinds server and dask-* only, no ``seen`` column) becomes today's, rows and
their ids kept, indexes and the other constraints still enforced. SQLite, and PostgreSQL from
scripts/postgres-up.sh (real; skipped where there is none, as in test_quota_service)."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

from tests.quota_support import fresh_postgres_database, postgres_url
from workbench.services.quota.ledger import Ledger, normalize_db_url

OLD_SCHEMA = """
CREATE TABLE quota_usage (
    id {id},
    item VARCHAR(255) NOT NULL,
    kind VARCHAR(32) NOT NULL,
    username VARCHAR(255) NOT NULL,
    group_name VARCHAR(255) NOT NULL,
    profile VARCHAR(255),
    cpu FLOAT NOT NULL,
    memory BIGINT NOT NULL,
    gpu_type VARCHAR(63),
    gpu_count INTEGER NOT NULL,
    start {ts} NOT NULL,
    stop {ts},
    start_event VARCHAR(255) NOT NULL,
    stop_event VARCHAR(255),
    opened_by VARCHAR(16) NOT NULL,
    closed_by VARCHAR(16),
    CONSTRAINT ck_quota_usage_kind CHECK (kind IN ('server', 'dask-scheduler', 'dask-worker')),
    CONSTRAINT ck_quota_usage_stop_after_start CHECK (stop IS NULL OR stop >= start),
    CONSTRAINT ck_quota_usage_resources CHECK (cpu >= 0 AND memory >= 0 AND gpu_count >= 0),
    UNIQUE (start_event),
    UNIQUE (stop_event)
);
CREATE UNIQUE INDEX ux_quota_usage_open_item ON quota_usage (item) WHERE stop IS NULL;
CREATE INDEX ix_quota_usage_group_start ON quota_usage (group_name, start);
CREATE INDEX ix_quota_usage_user_start ON quota_usage (username, start);
CREATE INDEX ix_quota_usage_item ON quota_usage (item);
CREATE INDEX ix_quota_usage_open_group ON quota_usage (group_name) WHERE stop IS NULL;
INSERT INTO quota_usage (id, item, kind, username, group_name, profile, cpu, memory, gpu_count, start, stop,
    start_event, stop_event, opened_by, closed_by)
VALUES (7, 'server:ada/', 'server', 'ada', 'physics-lab', 'cpu-large', 4, 1024, 0,
    '2026-11-02 10:00:00', '2026-11-02 12:00:00', 'start:a', 'stop:a', 'event', 'event');
INSERT INTO quota_usage (id, item, kind, username, group_name, profile, cpu, memory, gpu_count, start, stop,
    start_event, opened_by)
VALUES (9, 'dask-worker:ada/c1', 'dask-worker', 'ada', 'physics-lab', NULL, 1, 1024, 0,
    '2026-11-03 10:00:00', NULL, 'start:b', 'admit');
"""

ROW = (
    "INSERT INTO quota_usage (item, kind, username, group_name, cpu, memory, gpu_count, start, start_event, opened_by)"
    " VALUES ('{item}', '{kind}', 'ada', 'physics-lab', 1, 0, 0, '2026-11-04 10:00:00', '{event}', 'event')"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db(request, tmp_path):
    """The URL of a database holding the old schema and two rows (one closed, one open)."""
    if request.param == "sqlite":
        path = tmp_path / "quota.sqlite"
        with sqlite3.connect(path) as db:
            db.executescript(OLD_SCHEMA.format(id="INTEGER PRIMARY KEY", ts="DATETIME"))
        yield f"sqlite:///{path}"
        return
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL: run as root (scripts/postgres-up.sh) or set WORKBENCH_TEST_POSTGRES_URL")
    url, drop = fresh_postgres_database(base)
    engine = create_engine(normalize_db_url(url))
    with engine.begin() as c:
        for stmt in OLD_SCHEMA.format(id="BIGSERIAL PRIMARY KEY", ts="TIMESTAMP WITHOUT TIME ZONE").split(";"):
            if stmt.strip():
                c.exec_driver_sql(stmt)
    engine.dispose()
    yield url
    drop()


def _insert(url: str, item: str, kind: str, event: str) -> None:
    engine = create_engine(normalize_db_url(url))
    try:
        with engine.begin() as c:
            c.exec_driver_sql(ROW.format(item=item, kind=kind, event=event))
    finally:
        engine.dispose()


def test_an_old_ledger_gets_the_job_kind_at_start_and_keeps_its_rows(old_db):
    with pytest.raises(IntegrityError, match="ck_quota_usage_kind|CHECK constraint failed"):
        _insert(old_db, "job:ada/x", "job", "start:x")  # the old schema refuses jobs: the case to migrate

    ledger = Ledger(old_db)
    try:
        rows = {r.id: r for r in ledger.rows()}
        assert set(rows) == {7, 9}
        assert rows[7].item == "server:ada/" and rows[7].stop is not None and rows[7].cpu == 4
        assert rows[9].kind == "dask-worker" and rows[9].stop is None
        assert [r.id for r in ledger.open_rows()] == [9]
    finally:
        ledger.close()

    _insert(old_db, "job:ada/x", "job", "start:x")  # now a job's row is welcome
    with pytest.raises(IntegrityError):
        _insert(old_db, "gpu:ada/x", "gpu", "start:y")  # and other kinds still are not
    with pytest.raises(IntegrityError):
        _insert(old_db, "job:ada/x", "job", "start:z")  # the open-item index survived: one open row per item
    with pytest.raises(IntegrityError):
        _insert(old_db, "job:ada/y", "job", "start:a")  # so did the unique start events

    again = Ledger(old_db)  # a second start changes nothing
    try:
        ids = [r.id for r in again.rows()]
        assert len(ids) == 3 and {7, 9} <= set(ids)
        assert {r.kind for r in again.open_rows()} == {"dask-worker", "job"}
    finally:
        again.close()
