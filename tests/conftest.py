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
