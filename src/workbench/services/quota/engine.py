"""The quota ledger's database engine: URL normalisation, SQLite pragmas and the durability setting.

``durability`` says what a committed ledger write survives:

- ``"process"`` (the default): a kill -9 of the quota service (the commit has reached the database
  server, or SQLite's WAL file through ``write()``, before any answer is sent). SQLite runs WAL with
  ``synchronous=NORMAL`` (no fsync per commit; a machine crash or power cut may lose the last
  transactions), PostgreSQL sessions run with ``synchronous_commit=off`` (the commit returns once the WAL
  record is in the server's buffers; a crash of the PostgreSQL *server* may lose up to 3 x
  ``wal_writer_delay``, by default 0.6 s, of commits, never corrupting the database). Rows of items that
  were admitted in that window and keep running are opened again by the next reconcile (from the item's
  own start time), so usage is not lost, but until then a restarted quota service does not count them
  against the caps.
- ``"machine"``: also a machine crash or power cut (SQLite ``synchronous=FULL``, PostgreSQL's default
  ``synchronous_commit=on``): one fsync per commit, which costs ~5 ms (SQLite) to ~30 ms (PostgreSQL) per
  group commit on the development machine's disk.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

DURABILITY = ("process", "machine")

__all__ = ["DURABILITY", "check_durability", "make_engine", "normalize_db_url"]


def check_durability(durability: str) -> str:
    if durability not in DURABILITY:
        raise ValueError(
            f"quota ledger durability {durability!r} is not one of {', '.join(DURABILITY)}: use 'process' "
            "(survives a kill of the quota service) or 'machine' (also a machine crash; one fsync per commit)"
        )
    return durability


def normalize_db_url(url: str) -> str:
    """``postgresql://`` URLs use psycopg (3) when psycopg2 is not installed."""
    u = make_url(url)
    if u.drivername == "postgresql":
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, pool_size: int, durability: str = "process") -> Engine:
    check_durability(durability)
    url = normalize_db_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            raise ValueError("the quota ledger needs a database file (sqlite:////path/quota.sqlite), not :memory:")
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=120,
        )
        synchronous = "NORMAL" if durability == "process" else "FULL"

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # transactions are begun below, explicitly
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            # NORMAL: a commit is written to the WAL (survives a kill of this process), fsynced at checkpoints;
            # FULL: also fsynced at every commit (survives a power cut)
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # write transactions take SQLite's single write lock up front (BEGIN IMMEDIATE): checks and
            # inserts of one admission cannot interleave with another's, in this process or any other
            mode = "IMMEDIATE" if conn.get_execution_options().get("quota_write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    # libpq's startup options: every session of the pool, set before its first statement
    options = {"options": "-c synchronous_commit=off"} if durability == "process" else {}
    return create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=120, connect_args=options
    )
