"""Suite-wide pytest set-up: the CPython 3.11.2 ast guard, a time summary per test file, shared workbenches.

Debian bookworm's CPython 3.11.2 (the interpreter the test venv is built from, so that per-user
servers can run it) has a bug fixed in 3.11.5: ``ast.parse`` can raise
``SystemError: AST constructor recursion depth mismatch``. pytest calls ``ast.parse`` while it
formats a failing test's traceback, and that SystemError aborts the whole session with an
INTERNALERROR that hides *which* test failed. These two guards turn the interpreter bug into the
fallbacks pytest and ``traceback`` already have for unparsable source, so failures are reported.

``*.localhost`` resolves to loopback (:func:`_resolve_localhost_subdomains`): browsers resolve every
``<name>.localhost`` to 127.0.0.1 themselves (RFC 6761, section 6.3) and `workbench up` serves each user's
server at ``http://<user>.localhost:<port>/``, but glibc's resolver (``socket.getaddrinfo``, what requests
and aiohttp use) knows only ``localhost`` from /etc/hosts. The suite's process asks for such names as a browser
would, so tests can use the servers' real URLs; nothing else is resolved differently.

Parallel workers: the live modules run on pytest-xdist workers (``make test``; ``--dist loadgroup``): each worker
but the first uses its own account namespace (``WORKBENCH_ACCOUNT_PREFIX=wb<N>-``), a live module runs whole on one
worker, and the modules that use Slurm share one worker (:func:`xdist_group_of`).

Reporting: after pytest's own ``--durations`` list, the 15 slowest test files with the seconds of their
tests' setup + call + teardown (:func:`pytest_terminal_summary`).

Fixtures (here, not in tests/integration/conftest.py, because tests/browser uses them too)
----------------------------------------------------------------------------------------------
``demo_gpus_wb`` (session)
    One real embedded workbench on the demo policy with PRETEND GPUs (``--fake-gpus h100:1,h100-mig-1g:1``, a
    mock of the GPU, which these machines lack; tests/integration/test_profiles.py: devices exclusive between
    servers, MIG slices), plus one-member research groups with a budget (10 CPU-hours, 1 GPU-hour a month)
    and no ``dask`` section: ``noted`` in ``lab-noted`` (tests/integration/test_lab_notifications.py),
    ``toasted`` in ``lab-toasted`` (tests/browser/test_lab_notifications_browser.py), ``nodask`` in
    ``lab-nodask`` (tests/integration/test_embedded.py: no gateway access without a dask policy). Each module
    spends only its own group's budget and stops the servers it starts. At the end of the session it must stop
    with exit code 0 and leave no process behind. (``demo_wb`` in tests/integration/conftest.py is the demo
    policy as shipped, without GPUs.)
"""

from __future__ import annotations

import os
import re
import socket
import traceback

import pytest
from _pytest._code import code as _pytest_code
from _pytest._code import source as _pytest_source

# ---------------------------------------------------------------------------
# Parallel workers (pytest-xdist, `make test`): each worker but the first runs its workbenches in an account
# namespace of its own (WORKBENCH_ACCOUNT_PREFIX, workbench.sysusers), set here before any test module imports
# workbench, so that two workbenches running at once never share Unix accounts, groups, homes or cgroups.

_WORKER = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
if _WORKER and int(_WORKER.group(1)) > 0:
    os.environ["WORKBENCH_ACCOUNT_PREFIX"] = f"wb{int(_WORKER.group(1))}-"

#: live modules that use the machine's one Slurm node (its queue, its gpu partition's state, its GRES): one
#: parallel worker runs them one after the other (:func:`pytest_collection_modifyitems`)
SLURM_MODULES = frozenset(
    {"test_slurm.py", "test_slurm_spawner.py", "test_claims_slurm.py", "test_jobs.py", "test_jobs_lab.py"}
)


def xdist_group_of(nodeid: str) -> str | None:
    """The parallel group of a test (``--dist loadgroup``, :func:`pytest_xdist_make_scheduler`): a live module
    (tests/integration, tests/browser) runs whole on one worker, so its module fixtures start once; the Slurm
    modules share one group; other tests have none (pure)."""
    path = nodeid.split("::", 1)[0]
    if not path.startswith(("tests/integration/", "tests/browser/")):
        return None
    name = path.rsplit("/", 1)[-1]
    return "slurm" if name in SLURM_MODULES else path


def xdist_scope_of(nodeid: str) -> str:
    """The unit of work a parallel worker takes whole: the test's group (:func:`xdist_group_of`), else its
    module."""
    return xdist_group_of(nodeid) or nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: schedule by :func:`xdist_scope_of`, largest unit first.

    Not through ``xdist_group`` markers: pytest-xdist 3.8 puts a marked test in its group by appending
    ``@<group>`` to ``item._nodeid``, which pytest 9.2 no longer reads (a node's id is ``item._id``), so every
    test became its own unit, a module's tests were spread over the workers and each started the module's
    fixtures (workbenches) again. Scheduling by scope uses only xdist's scheduler interface."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkbenchScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope_of(nodeid)

    return WorkbenchScopes(config, log)


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
# *.localhost is loopback, as in browsers (RFC 6761): the servers' own origins of `workbench up`

_getaddrinfo = socket.getaddrinfo


def _resolve_localhost_subdomains(host, *args, **kwargs):
    """``socket.getaddrinfo`` with every ``<name>.localhost`` answered as 127.0.0.1 (other names as before)."""
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower().rstrip(".").endswith(".localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _resolve_localhost_subdomains


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


# ---------------------------------------------------------------------------
# Workbenches shared between modules (tests/integration and tests/browser)

#: user -> group of :func:`demo_gpus_wb`: each a one-member research group with a budget and no dask policy
BUDGET_GROUPS = {"noted": "lab-noted", "toasted": "lab-toasted", "nodask": "lab-nodask"}


def budget_policy_data() -> dict:
    """The demo policy plus the groups of :data:`BUDGET_GROUPS` (10 CPU-hours and 1 GPU-hour a month each)."""
    import yaml

    from tests.integration.harness import DEMO

    data = yaml.safe_load(DEMO.read_text())
    for user, group in BUDGET_GROUPS.items():
        data["auth"]["demo_users"][user] = {"groups": [group]}
        data["groups"][group] = {
            "kind": "research",
            "profiles": ["cpu-small"],
            "budget": {"cpu_hours": 10, "gpu_hours": 1, "period": "month"},
        }
    return data


@pytest.fixture(scope="session")
def demo_gpus_wb():
    import yaml

    from tests.integration.harness import Workbench, state_dir

    sd = state_dir()
    config = sd.parent / "platform.yaml"
    config.write_text(yaml.safe_dump(budget_policy_data()))
    w = Workbench(sd, config=config, extra_args=("--fake-gpus", "h100:1,h100-mig-1g:1")).start()
    try:
        yield w
    finally:
        code = w.stop()
    assert code == 0, w.output()[-3000:]
    assert not w.leftovers(), w.leftovers()
