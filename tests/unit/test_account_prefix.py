"""The account namespace (``WORKBENCH_ACCOUNT_PREFIX``): two workbenches on one machine never share accounts, groups
or cgroups. Pure checks, plus real `workbench up` and interpreter processes started with the variable set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.sysusers import ACCOUNT_PREFIX_ENV, account_prefix_problem

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("value", ["wb-", "wb1-", "wbstage-", "x-"])
def test_good_prefixes_are_taken(value):
    assert account_prefix_problem(value) is None


@pytest.mark.parametrize("value", ["", "wb", "Wb-", "1wb-", "wb--", "wb-1-", "wb_1-", "wbstagexx-", "wb 1-"])
def test_bad_prefixes_are_refused_naming_the_variable_and_the_fix(value):
    problem = account_prefix_problem(value)
    assert problem is not None and ACCOUNT_PREFIX_ENV in problem and "lowercase letter" in problem
    assert "unset it for the default 'wb-'" in problem


def _names(prefix: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ACCOUNT_PREFIX_ENV}
    if prefix is not None:
        env[ACCOUNT_PREFIX_ENV] = prefix
    code = (
        "import json; from workbench import sysusers, limits, runtime\n"
        "print(json.dumps({'user': sysusers.system_username('researcher'), 'reserved': sysusers.system_username("
        "'g-lab'), 'group': sysusers.unix_group_name('physics-lab'), 'instructors': sysusers.unix_group_name("
        "'intro', sysusers.INSTRUCTOR_GROUP_PREFIX), 'managed': list(sysusers.MANAGED_GROUP_PREFIXES), "
        "'cgroup': limits.PARENT, 'runtime': runtime.Runtime('c', 's', 'h', 'v', 'p').user_prefix}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_every_name_follows_the_namespace_and_the_default_is_unchanged():
    default = _names(None)
    assert default.pop("reserved").startswith("wb-ug-lab-")
    assert default == {
        "user": "wb-researcher",
        "group": "wb-g-physics-lab",
        "instructors": "wb-i-intro",
        "managed": ["wb-g-", "wb-i-"],
        "cgroup": "workbench",
        "runtime": "wb-",
    }
    other = _names("wbstage-")
    assert other["user"] == "wbstage-researcher" and other["group"] == "wbstage-g-physics-lab"
    assert other["instructors"] == "wbstage-i-intro" and other["managed"] == ["wbstage-g-", "wbstage-i-"]
    assert other["cgroup"] == "workbench-wbstage" and other["runtime"] == "wbstage-"
    # a hub user shaped like a group namespace still never gets a group's name in the other namespace
    assert other["reserved"].startswith("wbstage-ug-lab-")


def test_workbench_up_refuses_a_bad_prefix_before_starting_anything(tmp_path):
    env = {**os.environ, ACCOUNT_PREFIX_ENV: "Stage"}
    state = tmp_path / "state"
    proc = subprocess.run(
        [
            str(VENV_BIN / "workbench"),
            "up",
            "--config",
            str(ROOT / "hub_config" / "demo.yaml"),
            "--state-dir",
            str(state),
            "--port",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{ACCOUNT_PREFIX_ENV}='Stage' cannot prefix Unix account names" in proc.stdout + proc.stderr
    assert not state.exists()
