"""The admission committer's transaction, written in the database driver's own SQL and parameters.

One batch of admissions (``admission._commit_batch``) takes four statements in one transaction, whatever
its size (up to ``admission.BATCH_MAX`` rows):

1. which of the batch's event ids were recorded before (a retried admission: "replayed");
2. per item of the batch, its open row (a running item: "running") and its latest stop (a new row may not
   start before it), one ``GROUP BY`` query;
3. the new usage rows, one ``INSERT ... RETURNING id, item``;
4. their admit events, one ``INSERT``.

SQLAlchemy's Core would compile each statement and bind every row's parameters through the ``UTCDateTime``
type decorator (about half of a 200-row commit's time here, see benchmarks/README.md). These statements
are fixed text, sent with ``exec_driver_sql``, with the parameters already in the driver's form:

- SQLite (sqlite3, ``?``): ``IN (?, ...)`` lists and multi-row ``VALUES``, one text per batch size (cached);
  times as the text SQLAlchemy's SQLite ``DATETIME`` stores (``YYYY-MM-DD HH:MM:SS.ffffff``).
- PostgreSQL (psycopg, ``%s``): one array parameter per column (``= ANY(%s)``, ``unnest(%s::varchar[], ...)``),
  so the statements are short and the same for every batch size (psycopg parses a query's placeholders in
  Python: 3,000 of them cost more than the insert); times as naive UTC ``datetime``.

Either way rows written here and rows written by the ORM compare and sort alike. ``tests/unit/test_quota_batch_sql.py`` reads rows of both
back through the ORM on SQLite and PostgreSQL.

Pure builders (``statements``, ``bind_time``, ``read_time``) and one function doing the I/O
(``write_batch``), run by the ledger's writer inside its transaction.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from workbench.services.quota.accounting import as_utc

__all__ = ["bind_time", "read_time", "statements", "write_batch"]

# the columns an admission sets; the others (stop, seen, stop_event, closed_by) start NULL
USAGE = "item, kind, username, group_name, profile, cpu, memory, gpu_type, gpu_count, start, start_event"
USAGE_PG_TYPES = (
    "varchar",
    "varchar",
    "varchar",
    "varchar",
    "varchar",
    "float8",
    "bigint",
    "varchar",
    "integer",
    "timestamp",
    "varchar",
)
EVENTS = "id, type, item, time, received, outcome, row_id"


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


_PG_USAGE_COLUMNS = ", ".join(f"%s::{t}[]" for t in USAGE_PG_TYPES)
# PostgreSQL's statements take one array per column: the same text for every batch size
_PG_STATEMENTS = (
    "SELECT id, row_id FROM quota_events WHERE id = ANY(%s::varchar[])",
    "SELECT item, MAX(CASE WHEN stop IS NULL THEN id END), MAX(stop) FROM quota_usage "
    "WHERE item = ANY(%s::varchar[]) GROUP BY item",
    f"INSERT INTO quota_usage ({USAGE}, opened_by) SELECT u.*, 'admit' FROM unnest({_PG_USAGE_COLUMNS}) AS u "
    "RETURNING id, item",
    f"INSERT INTO quota_events ({EVENTS}) SELECT u.id, 'admit', u.item, u.t, u.t, 'admitted', u.row_id "
    "FROM unnest(%s::varchar[], %s::varchar[], %s::timestamp[], %s::bigint[]) AS u(id, item, t, row_id)",
)


def statements(dialect: str, ids: int = 0, items: int = 0, rows: int = 0) -> tuple[str, str, str, str]:
    """The four statements (prior events, item state, usage insert, event insert). SQLite's are for ``ids``
    event ids, ``items`` items and ``rows`` new rows; PostgreSQL's take arrays and ignore the sizes."""
    if dialect == "postgresql":
        return _PG_STATEMENTS
    if dialect != "sqlite":
        raise ValueError(f"the quota ledger's admission batches support SQLite and PostgreSQL, not {dialect!r}")
    return _sqlite_statements(ids, items, rows)


@lru_cache(maxsize=64)
def _sqlite_statements(ids: int, items: int, rows: int) -> tuple[str, str, str, str]:
    def marks(n: int) -> str:
        return ", ".join(["?"] * n)

    usage_row = f"({marks(USAGE.count(',') + 1)}, 'admit')"
    event_row = "(?, 'admit', ?, ?, ?, 'admitted', ?)"
    return (
        f"SELECT id, row_id FROM quota_events WHERE id IN ({marks(ids)})",
        "SELECT item, MAX(CASE WHEN stop IS NULL THEN id END), MAX(stop) FROM quota_usage "
        f"WHERE item IN ({marks(items)}) GROUP BY item",
        f"INSERT INTO quota_usage ({USAGE}, opened_by) VALUES {', '.join([usage_row] * rows)} RETURNING id, item",
        f"INSERT INTO quota_events ({EVENTS}) VALUES {', '.join([event_row] * rows)}",
    )


def _params(dialect: str, rows: list[tuple]):
    """Rows of parameters as the statement takes them: one flat tuple (SQLite), one list per column (PostgreSQL)."""
    if dialect == "postgresql":
        return tuple(list(col) for col in zip(*rows, strict=True))
    return tuple(v for row in rows for v in row)


def write_batch(conn, batch: list) -> list[tuple[str, int | None, datetime | None]]:
    """Record ``batch`` (admission._Pending entries, items unique) on ``conn``, a SQLAlchemy connection in a
    write transaction; per entry ("admitted", row, start) | ("replayed", row, None) | ("running", row, None)."""
    dialect = conn.dialect.name
    pg = dialect == "postgresql"
    ids = [p.event_id for p in batch]
    items = [p.request.item for p in batch]
    q_prior, q_state, _, _ = statements(dialect, len(ids), len(items))
    prior = dict(conn.exec_driver_sql(q_prior, _params(dialect, [(i,) for i in ids])).all())
    running: dict[str, int] = {}
    last: dict[str, datetime] = {}
    for item, open_id, stop in conn.exec_driver_sql(q_state, _params(dialect, [(i,) for i in items])).all():
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
    _, _, q_usage, q_events = statements(dialect, rows=len(todo))
    usage = []
    for i, start in todo:
        p, r = batch[i], batch[i].res
        usage.append(
            (
                p.request.item,
                p.request.kind,
                p.user,
                p.group,
                r.profile,
                float(r.cpu),
                r.memory,
                r.gpu_type,
                r.gpu_count,
                bind_time(dialect, start),
                p.event_id,
            )
        )
    # items are unique in a batch (the state holds one open row per item): ids map back by item
    row_ids = {item: row_id for row_id, item in conn.exec_driver_sql(q_usage, _params(dialect, usage)).all()}
    events = []
    for i, start in todo:
        p = batch[i]
        row_id = row_ids[p.request.item]
        out[i] = ("admitted", row_id, start)
        at = bind_time(dialect, p.now)
        events.append(
            (p.event_id, p.request.item, at, at, row_id) if not pg else (p.event_id, p.request.item, at, row_id)
        )
    conn.exec_driver_sql(q_events, _params(dialect, events))
    return out
