"""Unit tests of the ``workbench`` command (check, help); nothing is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench import __version__
from workbench.cli.main import main, summary_table
from workbench.policy import load_policy

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"


def test_check_demo_ok(capsys):
    assert main(["check", str(DEMO)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{DEMO}: valid (4 groups, 4 profiles)"
    assert lines[1] == ""
    header = lines[2].split()
    assert header[:3] == ["group", "kind", "profiles"]
    for group, kind in [
        ("physics-lab", "research"),
        ("course-ml101", "course"),
        ("startup-acme", "startup"),
        ("platform-admins", "admin"),
    ]:
        row = next(line for line in lines if line.startswith(group + " "))
        assert row.split()[1] == kind
    for profile in ["cpu-small", "cpu-large", "mig-1g", "h100-x1"]:
        assert any(line.startswith(profile + " ") for line in lines), profile


def test_check_rows_show_profiles_and_dask(capsys):
    main(["check", str(DEMO)])
    lines = capsys.readouterr().out.splitlines()
    physics = next(line for line in lines if line.startswith("physics-lab "))
    assert "cpu-large, h100-x1" in physics
    assert physics.endswith("4 / 8G / 4")
    admins = next(line for line in lines if line.startswith("platform-admins "))
    assert admins.split()[-1] == "-"  # no dask policy
    h100 = next(line for line in lines if line.startswith("h100-x1 "))
    assert h100.split() == ["h100-x1", "8", "64G", "1x", "h100", "gpu-pytorch"]


def test_summary_table_literal(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "auth": {"demo_users": {"u": {"groups": ["lab"]}}},
                "images": {"base": {"image": "b"}},
                "profiles": {"small": {"cpu": "500m", "memory": "512Mi"}},
                "groups": {
                    "lab": {
                        "kind": "research",
                        "profiles": ["small"],
                        "dask": {
                            "max_cores": 2,
                            "max_memory": "4G",
                            "max_workers": 3,
                            "worker_max_cores": 1,
                            "worker_max_memory": "1G",
                        },
                    },
                    "empty": {"kind": "course"},
                },
            },
            sort_keys=False,
        )
    )
    assert summary_table(load_policy(f)) == (
        "group  kind      profiles  dask (max cores / memory / workers)\n"
        "-----  --------  --------  -----------------------------------\n"
        "lab    research  small     2 / 4G / 3\n"
        "empty  course    -         -\n"
        "\n"
        "profile  cpu  memory     gpu  image\n"
        "-------  ---  ---------  ---  -----\n"
        "small    0.5  0.536871G  -    base"
    )


def test_check_bad_file(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["physics-lab"]["dask"]["max_coress"] = 9
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["check", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{f}: invalid platform policy (1 problem)\n")
    assert err == (
        f"{f}: invalid platform policy (1 problem)\n"
        "  - groups.physics-lab.dask.max_coress: unknown key; remove it or check its spelling\n"
    )


def test_check_dangling_reference(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    data = yaml.safe_load(DEMO.read_text())
    data["groups"]["physics-lab"]["profiles"] = ["cpu-large", "h100-x2"]
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["check", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{f}: invalid platform policy (1 problem)\n"
        "  - groups.physics-lab.profiles[1]: unknown profile 'h100-x2'; define it under 'profiles' "
        "or use one of: cpu-large, cpu-small, h100-x1, mig-1g\n"
    )


def test_check_missing_file(tmp_path, capsys):
    f = tmp_path / "missing.yaml"
    assert main(["check", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{f}: invalid platform policy (1 problem)\n"
        "  - <top level>: file not found; pass --config with the path to a platform YAML\n"
    )


def test_check_yaml_syntax_error(tmp_path, capsys):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\ngroups: [\n")
    assert main(["check", str(f)]) == 2
    err = capsys.readouterr().err
    assert "<top level>: not valid YAML at line 3, column 1" in err


def test_check_without_file_is_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2
    assert "the following arguments are required: file" in capsys.readouterr().err


def test_up_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["up", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: workbench up")
    assert "--allow-demo-auth-on-network" in out
    for opt in [
        "--config",
        "--port",
        "--bind",
        "--state-dir",
        "--system-users",
        "--no-system-users",
        "--no-quota",
        "--quota-every",
        "--fake-gpus",
        "--gateway-backend",
    ]:
        assert opt in out


def test_up_passes_the_quota_options(monkeypatch):
    import workbench.embedded.up as up_module

    seen = []
    monkeypatch.setattr(up_module, "up", lambda opts: seen.append(opts) or 0)
    assert main(["up", "--no-quota", "--quota-every", "5"]) == 0
    assert main(["up"]) == 0
    assert (seen[0].quota, seen[0].quota_every) == (False, 5.0)
    assert (seen[1].quota, seen[1].quota_every) == (True, 30.0)  # on by default, every 30 s


def test_up_rejects_both_system_user_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["up", "--system-users", "--no-system-users"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: workbench")
    assert "check" in out and "up" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"workbench {__version__}"


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["down"])
    assert info.value.code == 2
    assert "invalid choice: 'down'" in capsys.readouterr().err


def test_gateway_options_for_a_demo_account(capsys):
    from workbench.cli.main import main

    assert main(["gateway-options", "--user", "student1"]) == 0
    out = capsys.readouterr().out
    assert "limits from group course-ml101:" in out
    assert "up to 2 workers, 2 cores, 4G memory for workers" in out
    assert "up to 1 active cluster(s)" in out
    assert "worker_cores   default 1      min 1      max 1" in out


def test_gateway_options_explains_the_chosen_group_and_slurm_placement(capsys):
    from workbench.cli.main import main

    centre = str(Path(__file__).resolve().parents[2] / "hub_config/examples/centre.yaml")
    assert main(["gateway-options", "--config", centre, "--user", "x", "--groups", "course-ml101,vision-lab"]) == 0
    out = capsys.readouterr().out
    assert "limits from group vision-lab (most generous of: vision-lab, course-ml101)" in out
    assert "partition=gpu account=vision-lab qos=normal walltime=43200 s" in out
    assert "worker_gpus" in out


def test_gateway_options_without_dask_access_and_unknown_account(capsys):
    from workbench.cli.main import main

    assert main(["gateway-options", "--user", "admin"]) == 0
    assert "no Dask Gateway access" in capsys.readouterr().out
    assert main(["gateway-options", "--user", "nobody"]) == 2
    assert "'nobody' is not a demo account" in capsys.readouterr().err
