"""`pip install .` into a fresh virtual environment outside the checkout, then `workbench up` from an empty folder.

Real: the wheel built by pip from this checkout (with build isolation, as a user's `pip install .` builds it),
a new venv made from the system Python, pip resolving the dependencies (pinned to the versions of the test
environment with a constraints file, so that it reuses pip's cache), and a real `workbench up` (hub, proxy,
gateway and services) started from an empty folder. configurable-http-proxy comes from npm, as the README says,
here the one `make install` put in .venv. Nothing is stubbed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests

from tests.integration.harness import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel of this checkout installed (returns its bin folder)."""
    root = tmp_path_factory.mktemp("pkg")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)], check=True, timeout=300)
    freeze = subprocess.run([*pip, "freeze", "--exclude-editable"], capture_output=True, text=True, check=True)
    constraints = root / "constraints.txt"
    constraints.write_text(
        "".join(f"{line}\n" for line in freeze.stdout.splitlines() if not line.startswith("workbench"))
    )
    venv = root / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
    (wheel,) = wheels.glob("workbench-*.whl")
    subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(constraints),
            str(wheel),
        ],
        check=True,
        timeout=900,
    )
    return venv / "bin"


def test_the_wheel_ships_the_hub_config_and_the_lab_extension(installed):
    (wheel,) = installed.parent.parent.joinpath("wheels").glob("workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "workbench/hub_config/demo.yaml",
        "workbench/hub_config/examples/centre.yaml",
        "workbench/hub_config/jupyterhub_config.py",
        "workbench/hub_config/dask_gateway_config.py",
        "workbench/hub_config/jupyterhub_config_k8s.py",
        "workbench/labextension/package.json",
        "workbench-0.1.0.data/data/etc/jupyter/jupyter_server_config.d/workbench.json",
    ):
        assert needed in names, needed


def test_workbench_check_uses_the_shipped_demo_policy(installed, tmp_path):
    r = subprocess.run([str(installed / "workbench"), "check", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shipped = subprocess.run(
        [str(installed / "python"), "-c", "from workbench.embedded.up import DEFAULT_CONFIG; print(DEFAULT_CONFIG)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert shipped.startswith(str(installed.parent)) and shipped.endswith("workbench/hub_config/demo.yaml")
    r = subprocess.run([str(installed / "workbench"), "check", shipped], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "researcher" in r.stdout or "physics-lab" in r.stdout


def test_workbench_up_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    env = {
        **os.environ,
        # the fresh venv first; configurable-http-proxy (npm) from the test environment
        "PATH": f"{installed}:{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "WORKBENCH_DEMO_PASSWORD": "packaging-test",
    }
    env.pop("PYTHONPATH", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(installed / "workbench"), "up", "--no-system-users", "--port", str(port)],
            cwd=empty,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "Workbench is ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/hub/health", timeout=10).status_code == 200
        login = requests.get(f"http://127.0.0.1:{port}/hub/login", timeout=10)
        assert login.status_code == 200 and "password" in login.text.lower()
        assert (empty / ".workbench").is_dir()  # state in the current folder, nothing from the checkout
        # the hub runs the loader shipped in the installed package, not the checkout's
        hubs = [p for p in psutil.Process(proc.pid).children(recursive=True) if "jupyterhub" in " ".join(p.cmdline())]
        assert hubs, "no jupyterhub process"
        cmdline = " ".join(hubs[0].cmdline())
        assert str(installed.parent) in cmdline and str(REPO) not in cmdline, cmdline
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
