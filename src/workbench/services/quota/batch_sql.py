"""The admission committer's transaction, written in the database driver's own SQL and parameters.

One batch of admissions (``admission._commit_batch``) takes three statements in one transaction, whatever
its size (up to ``admission.BATCH_MAX`` rows):

1. which of the batch's event ids were recorded before (a retried admission: "replayed"), one ``IN`` query;
2. per item of the batch, its open row (a running item: "running") and its latest stop (a new row may not
   start before it), one ``GROUP BY`` query;
3. the new usage rows, one multi-row ``INSERT ... RETURNING id, item``, and their admit events, one multi-row
   ``INSERT``.

SQLAlchemy's Core would compile each statement and bind every row's 16 parameters through the
``UTCDateTime`` type decorator (about half of a 200-row commit's time here, see benchmarks/README.md);
these statements are fixed text per dialect and batch size, sent with ``exec_driver_sql``, and the
parameters are already in the driver's form: a naive UTC ``datetime`` for PostgreSQL, and for SQLite the
text SQLAlchemy's SQLite ``DATETIME`` stores (``YYYY-MM-DD HH:MM:SS.ffffff``), so rows written here and
rows written by the ORM compare and sort alike. ``tests/unit/test_quota_batch_sql.py`` reads rows of both
back through the ORM on SQLite and PostgreSQL.

Pure builders (``placeholders``, ``statements``, ``bind_time``) and one function doing the I/O
(``write_batch``), run by the ledger's writer inside its transaction.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from workbench.services.quota.accounting import as_utc

__all__ = ["USAGE_COLUMNS", "EVENT_COLUMNS", "bind_time", "read_time", "statements", "write_batch"]

USAGE_COLUMNS = (
    "item",
    "kind",
    "username",
    "group_name",
    "profile",
    "cpu",
    "memory",
    "gpu_type",
    "gpu_count",
    "start",
    "stop",
    "seen",
    "start_event",
    "stop_event",
    "opened_by",
    "closed_by",
)
EVENT_COLUMNS = ("id", "type", "item", "time", "received", "outcome", "row_id", "detail")


def _mark(dialect: str) -> str:
    """The driver's positional parameter: sqlite3 ``?`` (qmark), psycopg ``%s`` (format)."""
    if dialect == "sqlite":
        return "?"
    if dialect == "postgresql":
        return "%s"
    raise ValueError(f"the quota ledger's admission batches support SQLite and PostgreSQL, not {dialect!r}")


def bind_time(dialect: str, value: datetime) -> datetime | str:
    """``value`` as the driver takes it for a ``UTCDateTime`` column (what the type decorator would bind)."""
    naive = as_utc(value).replace(tzinfo=None)
    if dialect == "sqlite":
        return naive.isoformat(" ", "microseconds")  # SQLAlchemy's SQLite DATETIME text: YYYY-MM-DD HH:MM:SS.ffffff
    return naive


def read_time(value) -> datetime | None:
    """A ``UTCDateTime`` value read by the driver (SQLite: the stored text) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return as_utc(value)


@lru_cache(maxsize=64)
def statements(dialect: str, ids: int, items: int, rows: int) -> tuple[str, str, str, str]:
    """The four statements for ``ids`` event ids, ``items`` items and ``rows`` new rows (cached per size)."""
    m = _mark(dialect)

    def in_list(n: int) -> str:
        return ", ".join([m] * n)

    def values(n: int, width: int) -> str:
        one = "(" + ", ".join([m] * width) + ")"
        return ", ".join([one] * n)

    prior = f"SELECT id, row_id FROM quota_events WHERE id IN ({in_list(ids)})"
    state = (
        "SELECT item, MAX(CASE WHEN stop IS NULL THEN id END), MAX(stop) FROM quota_usage "
        f"WHERE item IN ({in_list(items)}) GROUP BY item"
    )
    usage = (
        f"INSERT INTO quota_usage ({', '.join(USAGE_COLUMNS)}) VALUES {values(rows, len(USAGE_COLUMNS))} "
        "RETURNING id, item"
    )
    events = f"INSERT INTO quota_events ({', '.join(EVENT_COLUMNS)}) VALUES {values(rows, len(EVENT_COLUMNS))}"
    return prior, state, usage, events


def write_batch(conn, batch: list) -> list[tuple[str, int | None, datetime | None]]:
    """Record ``batch`` (admission._Pending entries, items unique) on ``conn``, a SQLAlchemy connection in a
    write transaction; per entry ("admitted", row, start) | ("replayed", row, None) | ("running", row, None)."""
    dialect = conn.dialect.name
    ids = [p.event_id for p in batch]
    items = [p.request.item for p in batch]
    q_prior, q_state, _, _ = statements(dialect, len(ids), len(items), 0)
    prior = dict(conn.exec_driver_sql(q_prior, tuple(ids)).all())
    running: dict[str, int] = {}
    last: dict[str, datetime] = {}
    for item, open_id, stop in conn.exec_driver_sql(q_state, tuple(items)).all():
        if open_id is not None:
            running[item] = open_id
        if stop is not None:
            last[item] = read_time(stop)
    out: list = [None] * len(batch)
    todo: list[tuple[int, datetime]] = []
    for i, p in enumerate(batch):
        if p.event_id in prior:
            out[i] = ("replayed", prior[p.event_id], None)
        elif p.request.item in running:
            out[i] = ("running", running[p.request.item], None)
        else:
            now = as_utc(p.now)
            todo.append((i, max(now, last.get(p.request.item, now))))
    if not todo:
        return out
    _, _, q_usage, q_events = statements(dialect, 0, 0, len(todo))
    params: list = []
    for i, start in todo:
        p, r = batch[i], batch[i].res
        params += (
            p.request.item,
            p.request.kind,
            p.user,
            p.group,
            r.profile,
            r.cpu,
            r.memory,
            r.gpu_type,
            r.gpu_count,
            bind_time(dialect, start),
            None,
            None,
            p.event_id,
            None,
            "admit",
            None,
        )
    # items are unique in a batch (the state holds one open row per item): ids map back by item
    row_ids = {item: row_id for row_id, item in conn.exec_driver_sql(q_usage, tuple(params)).all()}
    params = []
    for i, start in todo:
        p = batch[i]
        row_id = row_ids[p.request.item]
        out[i] = ("admitted", row_id, start)
        at = bind_time(dialect, p.now)
        params += (p.event_id, "admit", p.request.item, at, at, "admitted", row_id, None)
    conn.exec_driver_sql(q_events, tuple(params))
    return out
