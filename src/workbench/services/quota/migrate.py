"""Schema migrations of the usage ledger, run at start (:meth:`workbench.services.quota.ledger.Ledger.create_schema`).

Each step looks at what the database has and changes only what is old, so running them again is a no-op:

- ``seen`` column (last known alive): ledgers made before it get it, nullable, no rewrite.
- ``ck_quota_usage_kind``: ledgers made before notebook jobs allow only ``server``/``dask-*`` kinds, so the
  first job's row would fail. PostgreSQL: the constraint is dropped and added again in one transaction.
  SQLite cannot alter a constraint: the table is rebuilt (renamed, made anew with its indexes, rows copied
  with their ids, old table dropped) in one ``BEGIN IMMEDIATE`` transaction, so a crash leaves the old one.

Both take the table (``UsageRow.__table__``) as an argument, so this module imports nothing of the ledger.
"""

from __future__ import annotations

import logging

from sqlalchemy import CheckConstraint, DateTime, Table, inspect
from sqlalchemy.engine import Engine

log = logging.getLogger("workbench.quota")

__all__ = ["KIND_CHECK", "migrate", "kind_check_sql"]

#: the name of the check constraint on the item kind
KIND_CHECK = "ck_quota_usage_kind"


def kind_check_sql(table: Table) -> str:
    """The SQL text of the table's current kind constraint (``kind IN (...)``), from the model."""
    for c in table.constraints:
        if isinstance(c, CheckConstraint) and c.name == KIND_CHECK:
            return str(c.sqltext)
    raise LookupError(f"{table.name} has no {KIND_CHECK} constraint")


def _add_seen(engine: Engine, table: Table) -> None:
    if "seen" not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
        kind = DateTime().compile(dialect=engine.dialect)
        with engine.begin() as c:
            c.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN seen {kind}")
        log.info("ledger migrated: %s has the column seen", table.name)


def _kinds_missing(definition: str | None, wanted: str) -> bool:
    """Whether a stored constraint lacks a kind the model's has (its quoted names)."""
    import re

    if definition is None:
        return True
    have = set(re.findall(r"'([^']+)'", definition))
    return not set(re.findall(r"'([^']+)'", wanted)) <= have


def _kind_check_postgresql(engine: Engine, table: Table) -> None:
    wanted = kind_check_sql(table)
    with engine.begin() as c:
        c.exec_driver_sql(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE")
        current = c.exec_driver_sql(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            f"WHERE conrelid = '{table.name}'::regclass AND conname = '{KIND_CHECK}'"
        ).scalar()
        if not _kinds_missing(current, wanted):
            return
        c.exec_driver_sql(f"ALTER TABLE {table.name} DROP CONSTRAINT IF EXISTS {KIND_CHECK}")
        c.exec_driver_sql(f"ALTER TABLE {table.name} ADD CONSTRAINT {KIND_CHECK} CHECK ({wanted})")
    log.info("ledger migrated: %s.%s is now %s", table.name, KIND_CHECK, wanted)


def _kind_check_sqlite(engine: Engine, table: Table) -> None:
    wanted = kind_check_sql(table)
    name = table.name
    old = f"{name}_before_migration"
    # quota_write: BEGIN IMMEDIATE (the ledger's engine), so no other writer runs between the look and the copy
    with engine.execution_options(quota_write=True).begin() as c:
        sql = c.exec_driver_sql(f"SELECT sql FROM sqlite_master WHERE type = 'table' AND name = '{name}'").scalar()
        if sql is None or not _kinds_missing(_sqlite_check(sql), wanted):
            return
        columns = [r[1] for r in c.exec_driver_sql(f"PRAGMA table_info({name})")]
        c.exec_driver_sql(f"DROP TABLE IF EXISTS {old}")
        c.exec_driver_sql(f"ALTER TABLE {name} RENAME TO {old}")
        for index in table.indexes:  # the renamed table keeps its indexes, by name
            c.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
        table.create(c)
        keep = ", ".join(col.name for col in table.columns if col.name in columns)
        c.exec_driver_sql(f"INSERT INTO {name} ({keep}) SELECT {keep} FROM {old}")
        c.exec_driver_sql(f"DROP TABLE {old}")
    log.info("ledger migrated: %s rebuilt with %s = %s", name, KIND_CHECK, wanted)


def _sqlite_check(table_sql: str) -> str | None:
    """The text of the kind constraint in SQLite's ``CREATE TABLE`` statement (up to its closing parenthesis)."""
    at = table_sql.find(KIND_CHECK)
    if at < 0:
        return None
    start = table_sql.find("(", at)
    depth = 0
    for i in range(start, len(table_sql)):
        depth += {"(": 1, ")": -1}.get(table_sql[i], 0)
        if depth == 0:
            return table_sql[start : i + 1]
    return table_sql[start:]


def migrate(engine: Engine, table: Table) -> None:
    """Bring an existing ledger table up to the model (after ``create_all``, which adds missing tables only)."""
    _add_seen(engine, table)
    if engine.dialect.name == "postgresql":
        _kind_check_postgresql(engine, table)
    elif engine.dialect.name == "sqlite":
        _kind_check_sqlite(engine, table)
