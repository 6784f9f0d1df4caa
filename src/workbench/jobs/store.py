"""The jobs service's table of jobs: one SQLite file in the state folder (``jobs.sqlite``, mode 0600)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

COLUMNS = (
    "id TEXT PRIMARY KEY",
    "user TEXT NOT NULL",
    "submitter TEXT NOT NULL",
    "grp TEXT NOT NULL",
    "profile TEXT NOT NULL",
    "notebook TEXT NOT NULL",
    "name TEXT NOT NULL",
    "run TEXT NOT NULL",
    "run_dir TEXT NOT NULL",
    "params TEXT NOT NULL",
    "time_limit INTEGER NOT NULL",
    "engine TEXT NOT NULL",
    "engine_id TEXT",
    "state TEXT NOT NULL",
    "reason TEXT",
    "submitted REAL NOT NULL",
    "started REAL",
    "ended REAL",
    "exit_code INTEGER",
    "cpu REAL NOT NULL",
    "gpu_type TEXT",
    "gpu_count INTEGER NOT NULL",
    "charged_start INTEGER NOT NULL DEFAULT 0",
    "charged_stop INTEGER NOT NULL DEFAULT 0",
    "gateway_token TEXT",  # the id (never the token) of the run's gateway token, until its end is handled
)
FINAL_STATES = ("completed", "failed", "cancelled", "timeout")


def private_sqlite(path: Path) -> sqlite3.Connection:
    """The service's SQLite file at ``path``: created 0600 and never through a symbolic link, rows as
    :class:`sqlite3.Row`."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    return db


class JobStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.db = private_sqlite(self.path)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(COLUMNS)})")
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for col in COLUMNS:  # a table of an older version gets the newer columns
            if col.split()[0] not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col}")
        self.db.commit()

    def add(self, job: dict) -> None:
        cols = list(job)
        self.db.execute(
            f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [json.dumps(v) if isinstance(v, dict) else v for v in job.values()],
        )
        self.db.commit()

    def update(self, job_id: str, **values) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values.values(), job_id])
        self.db.commit()

    def get(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def active(self, engine: str) -> list[dict]:
        marks = ", ".join("?" for _ in FINAL_STATES)
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE engine = ? AND state NOT IN ({marks}) ORDER BY submitted",
            (engine, *FINAL_STATES),
        )
        return [dict(r) for r in rows]

    def unsettled(self) -> list[dict]:
        """Ended jobs whose run is not yet recorded in the quota ledger."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE started IS NOT NULL AND ((charged_start = 0) OR (ended IS NOT NULL AND charged_stop = 0))"
        )
        return [dict(r) for r in rows]

    def gateway_pending(self) -> list[dict]:
        """Ended runs whose gateway access (token, clusters) is not yet ended."""
        marks = ", ".join("?" for _ in FINAL_STATES)
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE gateway_token IS NOT NULL AND state IN ({marks})", FINAL_STATES
        )
        return [dict(r) for r in rows]

    def visible_to(self, user: str, admin: bool) -> list[dict]:
        if admin:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY submitted DESC")
        else:
            rows = self.db.execute(
                "SELECT * FROM jobs WHERE user = ? OR submitter = ? ORDER BY submitted DESC", (user, user)
            )
        return [dict(r) for r in rows]
