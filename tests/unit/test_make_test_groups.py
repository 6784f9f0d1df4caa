"""`make test`'s two groups (Makefile: FAST_TESTS beside LIVE_TESTS): every test folder runs, and the group that
runs beside the live tests shares nothing machine-wide with them.

The live tests share the machine's wb-<name> accounts and homes, Slurm's one node and the demo workbenches, so a
test that starts a workbench, submits a Slurm job or uses the integration fixtures must be in LIVE_TESTS. Checked
here, on the source: a folder of tests missing from both groups (it would silently not run), in both (twice), or
a fast-group file that imports the integration harness or asks for one of its workbench/Slurm fixtures.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: fixtures that start or share a real workbench or the one-node Slurm (tests/conftest.py,
#: tests/integration/conftest.py, tests/integration/test_slurm.py)
LIVE_FIXTURES = {"demo_wb", "default_wb", "admin_token", "demo_gpus_wb", "slurm"}


def make_groups(makefile: str) -> dict[str, list[str]]:
    """The defaults of FAST_TESTS and LIVE_TESTS (``NAME ?= a b``) in the Makefile's text (pure)."""
    groups = {}
    for name in ("FAST_TESTS", "LIVE_TESTS"):
        m = re.search(rf"^{name} \?= (.+)$", makefile, re.M)
        assert m, f"the Makefile defines no {name} ?= ..."
        groups[name] = m.group(1).split()
    return groups


def test_make_groups_reads_the_defaults():
    text = "X ?= 1\nFAST_TESTS ?= tests/unit tests/chart\nLIVE_TESTS ?= tests/integration\n"
    assert make_groups(text) == {"FAST_TESTS": ["tests/unit", "tests/chart"], "LIVE_TESTS": ["tests/integration"]}


def test_every_test_folder_is_in_exactly_one_group():
    groups = make_groups((REPO / "Makefile").read_text())
    listed = groups["FAST_TESTS"] + groups["LIVE_TESTS"]
    assert len(listed) == len(set(listed)), f"a folder in both groups runs twice: {groups}"
    folders = {str(p.parent.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    covered = {f for f in folders if any(f == g or f.startswith(g + "/") for g in listed)}
    assert folders == covered, f"test folders `make test` would not run: {sorted(folders - covered)}"


def live_uses(path: Path) -> list[str]:
    """What in ``path`` needs the live group: imports of the integration harness, live fixtures as arguments."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = ("." * node.level) + (node.module or "")
            if "integration" in module or module.lstrip(".").startswith("harness"):
                found.append(f"imports {module}")
        elif isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if "tests.integration" in a.name]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [f"{node.name} uses fixture {a.arg}" for a in node.args.args if a.arg in LIVE_FIXTURES]
    return found


def test_live_uses_finds_the_harness_and_the_fixtures(tmp_path):
    sample = tmp_path / "test_x.py"
    sample.write_text(
        "from tests.integration.harness import Workbench\nfrom .harness import DEMO\n"
        "def test_a(default_wb, tmp_path):\n    pass\ndef test_b(tmp_path):\n    pass\n"
    )
    assert live_uses(sample) == [
        "imports tests.integration.harness",
        "imports .harness",
        "test_a uses fixture default_wb",
    ]


def test_the_fast_group_starts_no_workbench_and_no_slurm_job():
    groups = make_groups((REPO / "Makefile").read_text())
    offenders = {}
    for folder in groups["FAST_TESTS"]:
        for path in sorted((REPO / folder).rglob("*.py")):
            if uses := live_uses(path):
                offenders[str(path.relative_to(REPO))] = uses
    assert offenders == {}, f"these run beside the live tests but need the live group (move them): {offenders}"


#: what in a live module's source means it uses Slurm's one node (its queue, the gpu partition's state, its GRES)
SLURM_USES = re.compile(r'from \.test_slurm import|"--(?:gateway-backend|spawner)",\s*"slurm"|\bsqueue\b|\bsbatch\b')


def test_every_live_module_that_uses_slurm_runs_in_the_one_slurm_group():
    """`make test` runs the live modules on parallel workers (tests/conftest.py): two that used Slurm at once would
    see each other's jobs in the queue and one's partition changes; so every module using it must be in the
    ``slurm`` xdist group, and every module in that list must exist."""
    from tests.conftest import SLURM_MODULES, xdist_group_of

    live = [p for g in ("tests/integration", "tests/browser") for p in sorted((REPO / g).glob("test_*.py"))]
    using = {p.name for p in live if SLURM_USES.search(p.read_text())}
    assert using, "the pattern finds no Slurm module: it is out of date"
    assert using <= SLURM_MODULES, f"modules using Slurm outside the slurm group: {sorted(using - SLURM_MODULES)}"
    assert SLURM_MODULES <= {p.name for p in live}, f"no such module: {sorted(SLURM_MODULES - {p.name for p in live})}"
    for p in live:
        nodeid = f"{p.relative_to(REPO)}::test_x"
        expected = "slurm" if p.name in SLURM_MODULES else str(p.relative_to(REPO))
        assert xdist_group_of(nodeid) == expected
    assert xdist_group_of("tests/unit/test_policy.py::test_x") is None


def test_each_parallel_worker_but_the_first_takes_its_own_account_namespace():
    """tests/conftest.py sets WORKBENCH_ACCOUNT_PREFIX from the xdist worker's name before workbench is imported:
    checked in fresh interpreters that import the conftest as pytest would, then workbench."""
    import os
    import subprocess
    import sys

    code = "import tests.conftest; from workbench.sysusers import system_username; print(system_username('researcher'))"
    seen = {}
    for worker in ("", "gw0", "gw1", "gw3"):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "WORKBENCH_ACCOUNT_PREFIX")}
        if worker:
            env["PYTEST_XDIST_WORKER"] = worker
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        seen[worker] = out.stdout.strip()
    assert seen == {"": "wb-researcher", "gw0": "wb-researcher", "gw1": "wb1-researcher", "gw3": "wb3-researcher"}


def test_parallel_workers_take_a_live_module_whole_and_the_slurm_modules_together(tmp_path):
    """A real pytest-xdist run (2 workers, ``--dist loadgroup`` as `make test` runs it) of a small tree laid out like
    tests/, scheduled by tests/conftest.py: each live module's tests all run on one worker, in file order, and the
    Slurm modules' tests all on one worker. (The markers pytest-xdist documents for this do nothing with pytest 9.2,
    which went unnoticed: a module's fixtures were started once per worker that got some of its tests.)"""
    import os
    import subprocess
    import sys

    live = tmp_path / "tests" / "integration"
    live.mkdir(parents=True)
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.conftest import pytest_xdist_make_scheduler\n"
    )
    seen = tmp_path / "seen.txt"
    body = "import os, time\n" + "".join(
        f"def test_{i}(request):\n    time.sleep(0.2)\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        f"        f.write(request.node.nodeid + ' ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
        for i in range(4)
    )
    modules = ["test_a.py", "test_b.py", "test_c.py", "test_slurm.py", "test_jobs.py"]
    for name in modules:
        (live / name).write_text(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "WORKBENCH_ACCOUNT"))}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
         "-p", "no:hypothesispytest", "tests/integration"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in seen.read_text().splitlines()]
    assert len(rows) == 4 * len(modules), rows
    workers: dict[str, set[str]] = {}
    order: dict[str, list[str]] = {}
    for nodeid, worker in rows:
        module = nodeid.split("::")[0].rsplit("/", 1)[-1]
        workers.setdefault(module, set()).add(worker)
        order.setdefault(module, []).append(nodeid.split("::")[1])
    assert all(len(w) == 1 for w in workers.values()), workers
    assert workers["test_slurm.py"] == workers["test_jobs.py"], workers
    assert all(o == [f"test_{i}" for i in range(4)] for o in order.values()), order
    assert len(set().union(*workers.values())) == 2, f"one worker did all the work: {workers}"
