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
