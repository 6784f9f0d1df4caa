"""The Slurm backend runs upstream's jobqueue launcher as ``python -I <launcher file>`` (issue 12, target 3b).

Real parts: upstream's launcher file, run by this interpreter with ``-I``, really makes the staging folder and
runs the command. ``sudo`` is left out of the command in the run tests (``launcher_command`` is replaced by the
same command without ``sudo -nHu <account>``), so they do not need root or the ``wb-*`` accounts; the command
with ``sudo`` is checked as a list.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from dask_gateway_server.backends.jobqueue import launcher as jobqueue_launcher
from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend

from workbench.gateway import slurm as gateway_slurm
from workbench.gateway.slurm import WorkbenchSlurmBackend


def test_command_runs_the_launcher_file_isolated_as_the_account():
    b = WorkbenchSlurmBackend(launcher_python="/opt/venv/bin/python")
    assert b.launcher_command("wb-researcher") == [
        "sudo",
        "-nHu",
        "wb-researcher",
        "/opt/venv/bin/python",
        "-I",
        jobqueue_launcher.__file__,
    ]
    # without launcher_python: upstream's console script, as upstream runs it
    b = WorkbenchSlurmBackend(dask_gateway_jobqueue_launcher="/opt/venv/bin/dask-gateway-jobqueue-launcher")
    assert b.launcher_command("wb-x") == ["sudo", "-nHu", "wb-x", "/opt/venv/bin/dask-gateway-jobqueue-launcher"]


def test_launcher_file_needs_no_package_import():
    """Run with -I (no script folder on sys.path, no PYTHON* variables), the file answers on its own."""
    out = subprocess.run(
        [sys.executable, "-I", jobqueue_launcher.__file__],
        input=json.dumps({"action": "nothing"}),
        capture_output=True,
        text=True,
        env={},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": False, "error": "Valid actions are 'start' and 'stop'"}


@pytest.fixture
def backend(monkeypatch):
    """A backend whose launcher command is the fast one without sudo (runs as this user), accounts faked."""
    from types import SimpleNamespace

    b = WorkbenchSlurmBackend(user_prefix="wb-", launcher_python=sys.executable)
    monkeypatch.setattr(gateway_slurm, "ensure_system_user", lambda name: SimpleNamespace(pw_name=name))
    monkeypatch.setattr(b, "launcher_command", lambda unix: [sys.executable, "-I", jobqueue_launcher.__file__])

    async def upstream(self, user, action, **kwargs):  # must not be used when launcher_python is set
        raise AssertionError("upstream's do_as_user ran")

    monkeypatch.setattr(SlurmBackend, "do_as_user", upstream)
    return b


def test_start_job_through_the_fast_launcher(backend, tmp_path):
    staging = tmp_path / "cluster1"
    job = asyncio.run(
        backend.start_job(
            "researcher",
            [sys.executable, "-c", "import sys; print('4' + sys.stdin.read().strip())"],
            {},
            "2",
            staging_dir=str(staging),
            files={"dask.crt": "CERT"},
        )
    )
    assert job == "42"
    assert (staging / "dask.crt").read_text() == "CERT"
    assert oct(staging.stat().st_mode & 0o777) == "0o700"


def test_failing_submission_and_launcher_errors_are_reported(backend, tmp_path):
    with pytest.raises(Exception, match="Failed to submit job"):
        asyncio.run(backend.start_job("researcher", [sys.executable, "-c", "raise SystemExit(3)"], {}, ""))
    (tmp_path / "exists").mkdir()
    with pytest.raises(Exception, match="Error setting up staging directory"):
        asyncio.run(backend.start_job("researcher", ["true"], {}, "", staging_dir=str(tmp_path / "exists"), files={}))


def test_launcher_that_crashes_names_the_command(backend, monkeypatch):
    monkeypatch.setattr(backend, "launcher_command", lambda unix: [sys.executable, "-c", "raise SystemExit(5)"])
    with pytest.raises(Exception, match=r"Error running the jobqueue launcher .*\n  returncode: 5"):
        asyncio.run(backend.do_as_user("researcher", "start", cmd=["true"], env={}))
