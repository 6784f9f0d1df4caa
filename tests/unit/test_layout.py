"""The package's layout: engines over one core, no import cycle, each module importable alone.

Real imports in fresh interpreters (subprocesses); nothing is stubbed except, in one test, the Kubernetes
packages, which are hidden on purpose to prove that the embedded engine and the command do not need them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "workbench"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "hub_config" in path.parts:  # thin config loaders run by jupyterhub / dask-gateway-server, not modules
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def import_graph() -> dict[str, set[str]]:
    """module -> workbench modules it imports (at the top or inside functions)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{path}: relative import; use 'from workbench.… import …'")
            for name in names:
                while name and name not in MODULES:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    edges[mod].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_workbench_modules():
    assert cycles(import_graph()) == []


def test_core_modules_import_no_engine():
    """The core (policy, names, settings, spawn.common, gateway.options/quota, services.base) never imports an
    engine (embedded, kubernetes, the local/kube spawners, the local/slurm/kube gateway backends)."""
    edges = import_graph()
    core = [
        "workbench.policy",
        "workbench.names",
        "workbench.settings",
        "workbench.spawn.common",
        "workbench.gateway.options",
        "workbench.gateway.quota",
        "workbench.services.base",
        "workbench.auth.groups",
    ]
    engines = (
        "workbench.embedded",
        "workbench.kubernetes",
        "workbench.spawn.local",
        "workbench.spawn.kube",
        "workbench.gateway.local",
        "workbench.gateway.slurm",
        "workbench.gateway.kube",
        "workbench.cli",
    )
    for mod in core:
        assert not [m for m in edges[mod] if m.startswith(engines)], mod


def test_every_module_has_a_docstring_saying_what_it_owns():
    missing = [
        m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text())) and not p.name == "__main__.py"
    ]
    assert missing == []


def _import_alone(mod: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = (
        "import importlib, importlib.abc, sys\n"
        f"BLOCK = {block!r}\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by the test)', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"importlib.import_module({mod!r})\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('workbench', 'sqlalchemy', 'kube')))))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_every_module_imports_alone():
    wanted = [m for m in MODULES if not m.endswith("__main__")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(wanted, pool.map(_import_alone, wanted)))
    failed = {m: r.stderr.strip().splitlines()[-1:] for m, r in results.items() if r.returncode}
    assert failed == {}


KUBERNETES_PACKAGES = ("kubespawner", "kubernetes_asyncio", "kubernetes")


@pytest.mark.parametrize(
    "mod",
    [
        "workbench.cli.main",
        "workbench.embedded.up",
        "workbench.embedded.hub",
        "workbench.gateway.config",
        "workbench.gateway.local",
        "workbench.gateway.slurm",
        "workbench.services.quota.app",
        "workbench.services.sessions.app",
        "workbench.services.rosters.app",
        "workbench.lab",
    ],
)
def test_the_embedded_engine_needs_no_kubernetes_package(mod):
    """`pip install .` without the kubernetes extra, then `workbench up`, must work (it failed with
    ModuleNotFoundError: kubernetes_asyncio when the command's parser imported the Kubernetes gateway)."""
    r = _import_alone(mod, KUBERNETES_PACKAGES)
    assert r.returncode == 0, r.stderr


def test_the_command_builds_its_parser_without_kubernetes_and_says_what_render_needs(tmp_path):
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('kubespawner', 'kubernetes_asyncio', 'kubernetes'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from workbench.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    demo = PACKAGE / "hub_config" / "demo.yaml"
    ok = subprocess.run([sys.executable, "-c", code, "check", str(demo)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    r = subprocess.run(
        [sys.executable, "-c", code, "render-cluster", "--config", str(demo), "--user", "u"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "pip install 'workbench[kubernetes]'" in r.stderr


@pytest.mark.parametrize("hub_module", ["workbench.embedded.hub", "workbench.kubernetes.hub", "workbench.auth.oauth"])
def test_a_hub_process_imports_no_service_code(hub_module):
    """The hub imports the services' names and pure rules, never their servers or the quota ledger."""
    r = _import_alone(hub_module)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    for service_code in (
        "workbench.services.quota.ledger",
        "workbench.services.quota.app",
        "workbench.services.rosters.app",
        "workbench.services.sessions.app",
    ):
        assert service_code not in loaded, f"{hub_module} imports {service_code}"
