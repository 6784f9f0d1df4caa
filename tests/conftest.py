"""Suite-wide pytest set-up.

Debian bookworm's CPython 3.11.2 (the interpreter the test venv is built from, so that per-user
servers can run it) has a bug fixed in 3.11.5: ``ast.parse`` can raise
``SystemError: AST constructor recursion depth mismatch``. pytest calls ``ast.parse`` while it
formats a failing test's traceback, and that SystemError aborts the whole session with an
INTERNALERROR that hides *which* test failed. These two guards turn the interpreter bug into the
fallbacks pytest and ``traceback`` already have for unparsable source, so failures are reported.
"""

from __future__ import annotations

import traceback

from _pytest._code import code as _pytest_code
from _pytest._code import source as _pytest_source

_getstatementrange_ast = _pytest_source.getstatementrange_ast


def _guarded_getstatementrange_ast(*args, **kwargs):
    try:
        return _getstatementrange_ast(*args, **kwargs)
    except SystemError as exc:  # CPython < 3.11.5 ast bug: fall back like for a SyntaxError
        raise SyntaxError(f"source not parsable here: {exc}") from None


_pytest_source.getstatementrange_ast = _guarded_getstatementrange_ast
_pytest_code.getstatementrange_ast = _guarded_getstatementrange_ast

_caret_anchors = getattr(traceback, "_extract_caret_anchors_from_line_segment", None)
if _caret_anchors is not None:

    def _guarded_caret_anchors(segment):
        try:
            return _caret_anchors(segment)
        except SystemError:
            return None

    traceback._extract_caret_anchors_from_line_segment = _guarded_caret_anchors


# ---------------------------------------------------------------------------
# Where the suite's time goes: the slowest test files (setup + call + teardown of their tests)

_FILE_SECONDS: dict[str, float] = {}
_FILE_TESTS: dict[str, set[str]] = {}


def pytest_runtest_logreport(report):
    """Adds each phase's duration (setup, call, teardown) to the test's file."""
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)
    _FILE_TESTS.setdefault(path, set()).add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """The 15 slowest test files (setup + call + teardown seconds, module and session fixtures included where
    they ran), after pytest's own ``--durations`` list."""
    if not _FILE_SECONDS:
        return
    slowest = sorted(_FILE_SECONDS.items(), key=lambda kv: kv[1], reverse=True)[:15]
    total = sum(_FILE_SECONDS.values())
    terminalreporter.write_sep("=", "slowest 15 test files (setup + call + teardown)")
    for path, seconds in slowest:
        terminalreporter.write_line(f"{seconds:9.1f}s  {len(_FILE_TESTS[path]):4d} tests  {path}")
    terminalreporter.write_line(f"{total:9.1f}s  in all test phases of {len(_FILE_SECONDS)} files")
