"""The README's parity table (feature × engine) names only tests that exist.

Every cell either names tests as ``file::function`` (the file exists and defines that test function) or says
why there is none; every row has a cell per engine. Parsed from README.md itself, so a renamed or removed test
fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Engines: what each one guarantees"
ENGINES = ["embedded", "Slurm (Dask clusters; notebooks in supercomputer mode)", "Kubernetes"]
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def parity_table(text: str) -> list[list[str]]:
    """The rows of the first table after the parity heading (header included), as lists of cells."""
    if HEADING not in text:
        raise AssertionError(f"README.md has no section {HEADING!r}")
    rows, started = [], False
    for line in text.split(HEADING, 1)[1].splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # not the |---| line
                rows.append(cells)
        elif started:
            break
    return rows


def node_ids(rows: list[list[str]]) -> list[tuple[str, str]]:
    return [m.groups() for row in rows[1:] for cell in row[1:] for m in NODE.finditer(cell)]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_table_has_every_engine_and_a_cell_for_each():
    rows = parity_table((REPO / "README.md").read_text())
    assert rows[0] == ["feature", *ENGINES]
    assert len(rows) > 10
    for row in rows[1:]:
        assert len(row) == len(ENGINES) + 1 and all(row), row


def test_every_named_test_exists():
    ids = node_ids(parity_table((REPO / "README.md").read_text()))
    assert len(ids) >= 20
    missing = []
    for file, name in ids:
        path = REPO / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"the README's parity table names tests that do not exist: {missing}"


@pytest.mark.parametrize(
    "cell, problem",
    [
        ("`tests/unit/test_parity_table.py::test_no_such_test`", "tests/unit/test_parity_table.py::test_no_such_test"),
        ("`tests/unit/no_such_file.py::test_x`", "tests/unit/no_such_file.py::test_x"),
    ],
)
def test_a_missing_test_or_file_is_caught(cell, problem):
    text = f"{HEADING}\n\n| feature | {' | '.join(ENGINES)} |\n|---|---|---|---|\n| x | {cell} | a | b |\n"
    [(file, name)] = node_ids(parity_table(text))
    path = REPO / file
    assert f"{file}::{name}" == problem
    assert not (path.is_file() and name in defined_tests(path))
