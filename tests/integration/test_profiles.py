"""Profiles from the policy, enforced on the local spawner through the real hub (no mocks, except
the pretend GPU devices of `--fake-gpus`, named as such: these machines have no GPU)."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest

from workbench.limits import PARENT
from workbench.policy import load_policy
from workbench.sysusers import USER_PREFIX

from .harness import Workbench

pytestmark = pytest.mark.integration


@pytest.fixture
def wb(default_wb):
    """The shared default workbench (tests/integration/conftest.py). No GPU on this machine: GPU profiles
    must say so."""
    return default_wb


@pytest.fixture
def wb_gpus(demo_gpus_wb):
    """PRETEND GPUs (a mock of the GPU, which these machines lack): one H100, one MIG slice; the demo policy's
    profiles (the shared ``demo_gpus_wb`` of tests/conftest.py)."""
    return demo_gpus_wb


def user_model(w: Workbench, token: str, name: str) -> dict:
    return w.token_api(token, "GET", f"/users/{name}").json()


def profile_values(page: str) -> list[str]:
    return re.findall(r'name="profile" value="([^"]+)"', page)


def test_spawn_form_shows_only_entitled_profiles_grouped_and_described(wb):
    s = wb.login("student1")
    page = s.get(f"{wb.url}/hub/spawn/student1", timeout=30).content.decode()
    assert profile_values(page) == ["cpu-small", "mig-1g"]
    assert "ML 101 (course)" in page  # grouped under the group's name
    assert "1\u00d7 NVIDIA H100 MIG 1g.10gb slice" in page and "8 GB" in page  # described
    s = wb.login("researcher")
    page = s.get(f"{wb.url}/hub/spawn/researcher", timeout=30).content.decode()
    assert profile_values(page) == ["cpu-large", "h100-x1"]


def test_api_request_for_a_profile_not_entitled_is_refused_and_nothing_starts(wb):
    s = wb.login("student1")
    token = wb.new_token(s, "student1")
    r = wb.token_api(token, "POST", "/users/student1/server", json={"profile": "h100-x1"})
    assert r.status_code == 403, r.text
    assert "h100-x1" in r.json()["message"] and "cpu-small, mig-1g" in r.json()["message"]
    # the refusal happens in the spawn the POST waited for: by the time the 403 is answered, the hub has
    # cleaned up after it (jupyterhub.user.User.spawn), so there is nothing to wait for
    model = user_model(wb, token, "student1")
    assert model["servers"] == {} and not model.get("pending")
    with pytest.raises(AssertionError):
        wb.server_process("student1")


def test_form_post_for_a_profile_not_entitled_is_refused(wb):
    s = wb.login("student2")
    xsrf = s.cookies.get("_xsrf", path="/hub/")
    r = s.post(f"{wb.url}/hub/spawn/student2", data={"profile": "cpu-large", "_xsrf": xsrf}, timeout=30)
    assert r.status_code == 403
    assert "not available to you" in r.text
    token = wb.new_token(s, "student2")
    assert user_model(wb, token, "student2")["servers"] == {}


def test_unknown_profile_is_refused(wb):
    token = wb.new_token(wb.login("researcher"), "researcher")
    r = wb.token_api(token, "POST", "/users/researcher/server", json={"profile": "nope"})
    assert r.status_code == 403 and "'nope' is not available" in r.json()["message"]


def test_gpu_profile_without_gpu_gives_clear_error_and_clears_pending(wb):
    token = wb.new_token(wb.login("researcher"), "researcher")
    r = wb.token_api(token, "POST", "/users/researcher/server", json={"profile": "h100-x1"})
    # an answer, not 202 (a spawn still pending after the hub's slow_spawn_timeout): the refusal came from the
    # spawn itself, before anything started
    assert r.status_code == 409, r.text
    assert "No free GPU of type h100" in r.json()["message"] and "this machine has none" in r.json()["message"]
    model = user_model(wb, token, "researcher")
    assert model["servers"] == {} and not model.get("pending")
    # nothing is left stuck: the same user can start a CPU profile right away
    wb.start_server(token, "researcher", profile="cpu-large")
    wb.stop_server(token, "researcher")


def usable_limit_mechanism() -> str:
    """'cgroup-v2', 'cgroup-v1' or 'rlimit': what this machine lets root use, found by trying it here.

    A probe cgroup with a memory and a CPU limit is made (and removed) under this process's own cgroups, v2
    first as the README promises; rlimits only where neither hierarchy takes limits.
    """
    import uuid

    root = Path("/sys/fs/cgroup")
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path.lstrip("/")
    name = f"wb-test-probe-{uuid.uuid4().hex[:8]}"
    tries = []
    if (root / "cgroup.controllers").exists():
        tries.append(
            ("cgroup-v2", [(root / own.get("", "") / name, {"memory.max": "1073741824", "cpu.max": "100000 100000"})])
        )
    if (root / "memory").is_dir() and (root / "cpu").is_dir():
        tries.append(
            (
                "cgroup-v1",
                [
                    (root / "memory" / own.get("memory", "") / name, {"memory.limit_in_bytes": "1073741824"}),
                    (root / "cpu" / own.get("cpu", "") / name, {"cpu.cfs_quota_us": "100000"}),
                ],
            )
        )
    for mechanism, dirs in tries:
        made = []
        try:
            for folder, files in dirs:
                folder.mkdir()
                made.append(folder)
                for fname, value in files.items():
                    (folder / fname).write_text(value)
            return mechanism
        except OSError:
            continue
        finally:
            for folder in reversed(made):
                folder.rmdir()
    return "rlimit"


def test_limits_are_applied_to_the_server_process(wb):
    token = wb.new_token(wb.login("student1"), "student1")
    wb.start_server(token, "student1", profile="cpu-small")
    try:
        proc = wb.server_process("student1")
        env = proc.environ()
        assert env["WORKBENCH_PROFILE"] == "cpu-small"
        assert env["MEM_LIMIT"] == str(2 * 10**9) and env["CPU_LIMIT"] == "1"
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        mechanism = env["WORKBENCH_LIMITS"]
        # the one mechanism this machine allows, found by the test itself (not by the code under test)
        assert mechanism == usable_limit_mechanism(), mechanism
        cgroups = Path(f"/proc/{proc.pid}/cgroup").read_text()
        if mechanism == "cgroup-v1":
            mem_path = re.search(r"^\d+:memory:(.*)$", cgroups, re.M).group(1)
            assert mem_path.endswith(f"/{PARENT}/student1"), mem_path  # workbench-wbN on xdist worker gwN
            limit = int(Path(f"/sys/fs/cgroup/memory{mem_path}/memory.limit_in_bytes").read_text())
            assert abs(limit - 2 * 10**9) < 4096
            cpu_path = re.search(r"^\d+:cpu(?:,cpuacct)?:(.*)$", cgroups, re.M).group(1)
            assert int(Path(f"/sys/fs/cgroup/cpu{cpu_path}/cpu.cfs_quota_us").read_text()) == 100_000
        elif mechanism == "cgroup-v2":
            path = re.search(r"^0::(.*)$", cgroups, re.M).group(1)
            assert Path(f"/sys/fs/cgroup{path}/memory.max").read_text().strip() == str(2 * 10**9)
            assert Path(f"/sys/fs/cgroup{path}/cpu.max").read_text().split()[0] == "100000"
        else:
            assert mechanism == "rlimit"
            assert proc.rlimit(psutil.RLIMIT_DATA) == (2 * 10**9, 2 * 10**9)
        # the hub's log says which mechanism was used
        assert f"limits {mechanism} (1 CPU, 2000000000 bytes)" in wb.hub_log()
    finally:
        wb.stop_server(token, "student1")


def test_gpu_devices_are_exclusive_between_servers(wb_gpus):
    w = wb_gpus
    researcher = w.new_token(w.login("researcher"), "researcher")
    startup = w.new_token(w.login("startup"), "startup")
    w.start_server(researcher, "researcher", profile="h100-x1")
    try:
        assert w.server_process("researcher").environ()["CUDA_VISIBLE_DEVICES"] == "FAKE-h100-0"
        r = w.token_api(startup, "POST", "/users/startup/server", json={"profile": "h100-x1"})
        assert r.status_code == 409
        assert "1 requested, 0 of 1 free" in r.json()["message"]
        assert user_model(w, startup, "startup")["servers"] == {}
    finally:
        w.stop_server(researcher, "researcher")
    # released on stop: now the startup gets the device
    w.start_server(startup, "startup", profile="h100-x1")
    assert w.server_process("startup").environ()["CUDA_VISIBLE_DEVICES"] == "FAKE-h100-0"
    w.stop_server(startup, "startup")


def test_mig_slice_profile_gets_a_slice(wb_gpus):
    w = wb_gpus
    token = w.new_token(w.login("student2"), "student2")
    w.start_server(token, "student2", profile="mig-1g")
    try:
        env = w.server_process("student2").environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "FAKE-h100-mig-1g-0"
        other = w.new_token(w.login("student1"), "student1")
        r = w.token_api(other, "POST", "/users/student1/server", json={"profile": "mig-1g"})
        assert r.status_code == 409 and "h100-mig-1g" in r.json()["message"]
    finally:
        w.stop_server(token, "student2")


def test_fake_gpus_with_unknown_type_is_refused(tmp_path):
    import subprocess

    from .harness import VENV_BIN

    res = subprocess.run(
        [str(VENV_BIN / "workbench"), "up", "--fake-gpus", "b200:1", "--state-dir", str(tmp_path / "s"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "unknown GPU types ['b200']" in res.stderr


def test_group_shared_folder_and_datasets_at_the_kubernetes_paths(wb):
    import grp
    import os
    import stat
    import subprocess

    token = wb.new_token(wb.login("researcher"), "researcher")
    wb.start_server(token, "researcher", profile="cpu-large")
    try:
        storage = load_policy(wb.config).storage  # demo.yaml's (tests/integration/harness.py: namespaced_config)
        shared = Path(storage.shared.format(group="physics-lab"))  # as mounted in pods
        st = shared.stat()
        gid = grp.getgrnam(f"{USER_PREFIX}g-physics-lab").gr_gid
        assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o2770
        proc = wb.server_process("researcher")
        groups = next(
            line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("Groups:")
        )
        assert str(gid) in groups.split()[1:], "the server runs with the group's gid"
        # a member writes (as the server would), and files stay in the group (setgid folder)
        probe = subprocess.run(
            ["touch", str(shared / "from-researcher")],
            user=f"{USER_PREFIX}researcher",
            extra_groups=[gid],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stderr
        assert (shared / "from-researcher").stat().st_gid == gid
        # a non-member does not even see inside
        other = subprocess.run(["ls", str(shared)], user="nobody", capture_output=True, text=True)
        assert other.returncode != 0 and "Permission denied" in other.stderr
        datasets = Path(storage.datasets)
        assert stat.S_IMODE(datasets.stat().st_mode) == 0o755 and datasets.stat().st_uid == 0
        ro = subprocess.run(
            ["touch", str(datasets / "x")], user=f"{USER_PREFIX}researcher", capture_output=True, text=True
        )
        assert ro.returncode != 0, "datasets are read-only for users"
        os.unlink(shared / "from-researcher")
    finally:
        wb.stop_server(token, "researcher")
