"""Pure checks `workbench up` makes before it starts anything."""

from __future__ import annotations

from workbench.embedded import up


def test_slurm_backend_needs_per_user_accounts_sbatch_and_sudo(monkeypatch):
    assert "run as root" in up.slurm_problem(False)
    monkeypatch.setattr(up.shutil, "which", lambda name: None)
    assert "sbatch not found; run `make slurm`" in up.slurm_problem(True)
    monkeypatch.setattr(up.shutil, "which", lambda name: "/usr/bin/sbatch" if name == "sbatch" else None)
    assert "needs sudo" in up.slurm_problem(True)
    monkeypatch.setattr(up.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert up.slurm_problem(True) is None


def test_fake_gpus_and_local_inventory(monkeypatch):
    from workbench.policy import load_policy

    policy = load_policy(up.DEFAULT_CONFIG)
    assert up.local_gpus(policy, "h100:2") == {"h100": ["FAKE-h100-0", "FAKE-h100-1"]}
    monkeypatch.setattr(up, "detect_devices", lambda: [])
    assert up.local_gpus(policy) == {"h100": [], "h100-mig-1g": []}


def test_remembered_ports_are_reused_when_free_and_replaced_with_a_note_when_taken():
    fresh = iter(range(20000, 20100))
    remembered = {"hub_port": 18081, "proxy_api_port": 18001, "gateway_port": "x", "quota_port": 18001}
    ports, notes = up.choose_ports(
        remembered,
        names=("hub_port", "proxy_api_port", "gateway_port", "quota_port", "sessions_port"),
        in_use=lambda port: port == 18081,  # something else took the old hub port
        pick=lambda: next(fresh),
    )
    assert ports == {
        "hub_port": 20000,  # taken: a new one, and a note saying servers of the last start cannot reach it
        "proxy_api_port": 18001,  # free: the same as last time
        "gateway_port": 20001,  # not a port: a new one
        "quota_port": 20002,  # never two names on one port
        "sessions_port": 20003,
    }
    assert notes == ["hub_port 18081 is in use now"]
    # the public port (--port) is never an internal one, even when remembered as one
    ports, notes = up.choose_ports({"hub_port": 8000}, names=("hub_port",), in_use=lambda p: False,
                                   pick=lambda: 20100, reserved=(8000,))  # fmt: skip
    assert ports == {"hub_port": 20100}


def test_stable_ports_survive_a_restart_of_the_same_state_folder(tmp_path, capsys):
    first = up.stable_ports(tmp_path)
    assert set(first) == set(up.PORT_NAMES) and len(set(first.values())) == len(first)
    assert (tmp_path / "ports.json").stat().st_mode & 0o777 == 0o600
    assert up.stable_ports(tmp_path) == first  # nothing listens on them here: all reused
    assert f"reusing the ports of the previous start from {tmp_path / 'ports.json'}" in capsys.readouterr().out
