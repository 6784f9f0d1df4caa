"""docs/claims.md: every claim of the README names tests that exist.

The table's rows are ``| claim | test<br>test... | engine |``; each test is ``path::function``. A row without a
test, a file that does not exist or a function the file does not define fails here, naming the row.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLAIMS = REPO / "docs" / "claims.md"
TEST_REF = re.compile(r"^(tests/[\w/]+\.py)::(\w+)$")


def claim_rows(text: str) -> list[tuple[str, list[str], str]]:
    """(claim, [test references], engine) for each row of the first table (pure)."""
    rows = []
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "claim" or set(line.replace("|", "").strip()) <= {"-", " "}:
            in_table = True
            continue
        claim, tests, engine = (cells + ["", "", ""])[:3]
        refs = [t.strip() for t in re.split(r"<br>|,", tests) if t.strip()]
        rows.append((claim, refs, engine))
    return rows


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def problems(rows: list[tuple[str, list[str], str]], root: Path = REPO) -> list[str]:
    out = []
    for claim, refs, engine in rows:
        if not refs:
            out.append(f"{claim!r}: no test proves it")
        if not engine:
            out.append(f"{claim!r}: no engine named")
        for ref in refs:
            m = TEST_REF.match(ref)
            if not m:
                out.append(f"{claim!r}: {ref!r} is not tests/<file>.py::<test function>")
                continue
            path = root / m.group(1)
            if not path.is_file():
                out.append(f"{claim!r}: {m.group(1)} does not exist")
            elif m.group(2) not in defined_tests(path):
                out.append(f"{claim!r}: {m.group(1)} defines no {m.group(2)}")
            elif not m.group(2).startswith("test_"):
                out.append(f"{claim!r}: {m.group(2)} is not a test (pytest collects test_* only)")
    return out


def test_every_claim_names_tests_that_exist():
    rows = claim_rows(CLAIMS.read_text())
    assert len(rows) >= 40, f"the claims table lost rows ({len(rows)})"
    assert problems(rows) == []


@pytest.mark.parametrize(
    "row, expected",
    [
        ("| a claim |  | embedded |", "'a claim': no test proves it"),
        (
            "| a claim | tests/unit/test_nothing_here.py::test_x | unit |",
            "tests/unit/test_nothing_here.py does not exist",
        ),
        ("| a claim | tests/unit/test_claims.py::test_that_is_not_here | unit |", "defines no test_that_is_not_here"),
        ("| a claim | test_claims::claim_rows | unit |", "is not tests/<file>.py::<test function>"),
        ("| a claim | tests/unit/test_claims.py::claim_rows | unit |", "claim_rows is not a test"),
        ("| a claim | tests/unit/test_claims.py::test_every_claim_names_tests_that_exist |  |", "no engine named"),
    ],
)
def test_the_check_fails_for_a_claim_without_a_real_test(row, expected):
    text = f"| claim | test | engine |\n|---|---|---|\n{row}\n"
    found = problems(claim_rows(text))
    assert len(found) == 1 and expected in found[0], found


def test_the_table_ends_at_the_first_non_table_line():
    text = (
        "intro\n\n| claim | test | engine |\n|---|---|---|\n"
        "| one | tests/unit/test_claims.py::test_the_table_ends_at_the_first_non_table_line<br>"
        "tests/unit/test_claims.py::test_every_claim_names_tests_that_exist | unit |\n\n| other | table | x |\n"
    )
    assert claim_rows(text) == [
        (
            "one",
            [
                "tests/unit/test_claims.py::test_the_table_ends_at_the_first_non_table_line",
                "tests/unit/test_claims.py::test_every_claim_names_tests_that_exist",
            ],
            "unit",
        )
    ]
