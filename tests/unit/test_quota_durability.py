"""What an answered admission survives, and that no answer leaves before its batch's commit returned.

- The durability setting of the ledger (workbench.services.quota.engine) is read back in the connection the
  admissions commit in (``Ledger._write``, which ``admission._commit_batch`` uses): SQLite ``PRAGMA
  synchronous``, PostgreSQL ``SHOW synchronous_commit`` (real PostgreSQL from scripts/postgres-up.sh; skipped
  where there is none, as in test_quota_migrate).
- The group commit is replaced by a stand-in that wraps the real one and blocks until the test releases it: no
  answer of the burst is delivered while it blocks, and every answer comes after the commit of the batch that
  holds it has returned (a log written by the stand-in's thread and the callers, in order).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import text

from tests.quota_support import POLICY, Clock, admit_request, database_url, t
from workbench.services.quota import admission
from workbench.services.quota.admission import Admitter
from workbench.services.quota.ledger import Ledger, default_db_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    url, drop = database_url(request.param, tmp_path)
    yield url
    drop()


@pytest.mark.parametrize(
    "durability, sqlite_synchronous, pg_synchronous_commit", [("process", 1, "off"), ("machine", 2, "on")]
)
def test_the_durability_setting_is_what_the_admission_connection_runs_with(
    db_url, durability, sqlite_synchronous, pg_synchronous_commit
):
    ledger = Ledger(db_url, POLICY, durability=durability)
    try:
        if ledger.dialect == "sqlite":
            # PRAGMA synchronous: 1 = NORMAL (WAL written, fsync at checkpoints), 2 = FULL (fsync per commit)
            assert ledger._write(lambda s: s.execute(text("PRAGMA journal_mode")).scalar()) == "wal"
            assert ledger._write(lambda s: s.execute(text("PRAGMA synchronous")).scalar()) == sqlite_synchronous
        else:
            got = ledger._write(lambda s: s.execute(text("SHOW synchronous_commit")).scalar())
            assert got == pg_synchronous_commit
    finally:
        ledger.close()


def test_the_default_durability_is_a_kill_of_the_service_and_a_wrong_one_names_the_choices(tmp_path):
    ledger = Ledger(default_db_url(tmp_path), POLICY)
    try:
        assert ledger.durability == "process"
    finally:
        ledger.close()
    with pytest.raises(ValueError, match=r"durability 'disk' is not one of process, machine: use 'process'"):
        Ledger(default_db_url(tmp_path / "b"), POLICY, durability="disk")


def test_no_answer_leaves_before_its_batch_commit_returned(tmp_path, monkeypatch):
    ledger = Ledger(default_db_url(tmp_path), POLICY, clock=Clock(t(2026, 11, 30, 22, 0)))
    admitter = Admitter(ledger)
    real = admission._commit_batch
    entered, release = threading.Event(), threading.Event()
    log: list[tuple[str, object]] = []  # ("committed", items) from the committer thread, ("answer", item) callers

    def blocking_commit(led, batch):
        entered.set()
        assert release.wait(60), "the test never released the commit"
        out = real(led, batch)
        log.append(("committed", {p.request.item for p in batch}))
        return out

    monkeypatch.setattr(admission, "_commit_batch", blocking_commit)

    async def one(i):
        d = await admitter.admit(f"u{i}", "startup-acme", admit_request(f"dask-worker:d/{i}"))
        log.append(("answer", f"dask-worker:d/{i}"))
        return d

    async def run():
        tasks = [asyncio.ensure_future(one(i)) for i in range(50)]
        assert await asyncio.to_thread(entered.wait, 60)
        # the first batch's commit has begun (so every decision of the burst is made) and is blocked
        assert not any(task.done() for task in tasks)
        assert log == []
        release.set()
        return await asyncio.gather(*tasks)

    try:
        decisions = asyncio.run(run())
        assert all(d.allowed for d in decisions)
        committed: set[str] = set()
        answers = 0
        for what, x in log:
            if what == "committed":
                committed |= x
            else:
                assert x in committed, f"{x} was answered before the commit of its batch returned"
                answers += 1
        assert answers == 50
        assert {r.item for r in ledger.open_rows()} == {f"dask-worker:d/{i}" for i in range(50)}
    finally:
        admitter.close()
        ledger.close()
