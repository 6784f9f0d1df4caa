"""Unit tests of workbench.policy: validation messages, quantities, durations, pure queries."""

from __future__ import annotations

import copy
from pathlib import Path

import pydantic
import pytest
import yaml

from workbench.policy import (
    DaskPolicy,
    Policy,
    PolicyError,
    load_policy,
    parse_duration,
    parse_policy,
    parse_quantity,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hub_config" / "demo.yaml"

UNKNOWN_KEY = "unknown key; remove it or check its spelling"
QUANTITY_HINT = (
    "expected a memory size like 8G, 512Mi or 1.5Gi (number then unit, no space; "
    "units k, M, G, T, Ki, Mi, Gi, Ti), got "
)
DURATION_HINT = "expected a duration like 90, 30s, 15m, 8h or 2d, got "


def minimal() -> dict:
    """A small valid policy, as YAML would load it."""
    return {
        "name": "Test",
        "auth": {
            "type": "demo",
            "admin_groups": ["admins"],
            "demo_users": {
                "alice": {"groups": ["physics-lab"]},
                "bob": {"groups": ["course-x", "physics-lab"]},
                "root": {"groups": ["admins"]},
            },
        },
        "gpu_types": {"h100": {"resource": "nvidia.com/gpu"}},
        "images": {"base": {"image": "workbench/base:1"}, "gpu": {"image": "workbench/gpu:1"}},
        "profiles": {
            "small": {"cpu": 1, "memory": "2G", "image": "base"},
            "large": {"cpu": 4, "memory": "16G", "image": "base"},
            "gpu1": {"cpu": 8, "memory": "64G", "image": "gpu", "gpu": {"type": "h100", "count": 1}},
        },
        "groups": {
            "physics-lab": {
                "kind": "research",
                "profiles": ["large", "gpu1"],
                "dask": {
                    "max_cores": 8,
                    "max_memory": "32G",
                    "max_workers": 8,
                    "worker_max_cores": 2,
                    "worker_max_memory": "4G",
                },
            },
            "course-x": {
                "kind": "course",
                "instructors": ["bob"],
                "profiles": ["small"],
                "dask": {
                    "max_cores": 2,
                    "max_memory": "4G",
                    "max_workers": 2,
                    "worker_max_cores": 1,
                    "worker_max_memory": "1G",
                },
            },
            "admins": {"kind": "admin", "profiles": ["small"]},
        },
    }


def problems_of(data, source="test.yaml") -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data, source=source)
    assert info.value.source == source
    return info.value.problems


def only_problem(data) -> tuple[str, str]:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------
# Valid inputs
# ---------------------------------------------------------------------------


def test_minimal_policy_is_valid():
    p = parse_policy(minimal())
    assert isinstance(p, Policy)
    assert list(p.groups) == ["physics-lab", "course-x", "admins"]
    assert p.profiles["gpu1"].gpu.type == "h100"
    assert p.profiles["gpu1"].gpu.count == 1
    assert p.profiles["large"].memory == 16 * 10**9


def test_demo_yaml_is_valid():
    p = load_policy(DEMO)
    assert p.name == "Workbench demo"
    assert list(p.groups) == ["physics-lab", "course-ml101", "startup-acme", "platform-admins"]
    assert list(p.profiles) == ["cpu-small", "cpu-large", "mig-1g", "h100-x1"]
    assert p.auth.type == "demo"
    assert p.auth.admin_groups == ["platform-admins"]
    assert set(p.auth.demo_users) == {"researcher", "instructor", "student1", "student2", "startup", "admin"}
    assert p.culling.timeout == 3600
    assert p.culling.every == 300
    assert p.groups["startup-acme"].session.max_age == 8 * 3600
    assert p.groups["physics-lab"].dask.idle_timeout == 30 * 60
    assert p.groups["physics-lab"].dask.worker_max_memory == 2 * 10**9
    assert p.groups["platform-admins"].dask is None
    assert p.profiles["mig-1g"].gpu.type == "h100-mig-1g"


def test_empty_document_gives_defaults_but_demo_needs_users():
    # an empty file loads as None: defaults apply, and demo auth then needs at least one user
    assert only_problem(None) == ("auth.demo_users", "auth type 'demo' needs at least one demo user")


def test_defaults():
    p = parse_policy({"auth": {"demo_users": {"u": {}}}})
    assert p.auth.type == "demo"
    assert p.auth.demo_users["u"].groups == [] and p.auth.demo_users["u"].admin is False
    assert p.name == "Workbench"
    assert p.culling.enabled is True
    assert p.culling.timeout == 3600
    assert p.culling.every == 300
    assert p.storage.home == "/home/{system_user}"
    assert p.groups == {}
    d = DaskPolicy()
    assert (d.max_cores, d.max_memory, d.max_workers, d.max_clusters) == (4.0, 16 * 10**9, 4, 1)
    assert (d.worker_max_cores, d.worker_max_memory, d.idle_timeout) == (2.0, 8 * 10**9, 1800)


# ---------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------


def test_unknown_top_level_key():
    d = minimal()
    d["nmae"] = "typo"
    assert only_problem(d) == ("nmae", UNKNOWN_KEY)


def test_unknown_nested_key():
    d = minimal()
    d["groups"]["physics-lab"]["dask"]["max_coress"] = 3
    assert only_problem(d) == ("groups.physics-lab.dask.max_coress", UNKNOWN_KEY)


def test_unknown_key_in_profile_and_message_text():
    d = minimal()
    d["profiles"]["small"]["gpus"] = 1
    with pytest.raises(PolicyError) as info:
        parse_policy(d, source="platform.yaml")
    assert str(info.value) == (
        "platform.yaml: invalid platform policy (1 problem)\n"
        "  - profiles.small.gpus: unknown key; remove it or check its spelling"
    )


def test_missing_required_field():
    d = minimal()
    d["images"]["broken"] = {"display_name": "no image"}
    assert only_problem(d) == ("images.broken.image", "required field is missing")


def test_missing_group_kind():
    d = minimal()
    del d["groups"]["admins"]["kind"]
    assert only_problem(d) == ("groups.admins.kind", "required field is missing")


# ---------------------------------------------------------------------------
# Dangling references
# ---------------------------------------------------------------------------


def test_group_references_unknown_profile():
    d = minimal()
    d["groups"]["physics-lab"]["profiles"] = ["large", "h100-x2"]
    assert only_problem(d) == (
        "groups.physics-lab.profiles[1]",
        "unknown profile 'h100-x2'; define it under 'profiles' or use one of: gpu1, large, small",
    )


def test_profile_references_unknown_image():
    d = minimal()
    d["profiles"]["small"]["image"] = "pytorch"
    assert only_problem(d) == (
        "profiles.small.image",
        "unknown image 'pytorch'; define it under 'images' or use one of: base, gpu",
    )


def test_profile_default_image_base_must_exist():
    d = minimal()
    d["images"] = {"gpu": {"image": "x"}}
    d["profiles"] = {"p": {"image": "gpu"}, "q": {}}  # q uses the default image 'base'
    for g in d["groups"].values():
        g["profiles"] = []
    assert only_problem(d) == (
        "profiles.q.image",
        "unknown image 'base'; define it under 'images' or use one of: gpu",
    )


def test_profile_references_unknown_gpu_type():
    d = minimal()
    d["profiles"]["gpu1"]["gpu"]["type"] = "a100"
    assert only_problem(d) == (
        "profiles.gpu1.gpu.type",
        "unknown GPU type 'a100'; define it under 'gpu_types' or use one of: h100",
    )


def test_unknown_gpu_type_with_no_gpu_types_defined():
    d = minimal()
    del d["gpu_types"]
    assert only_problem(d) == (
        "profiles.gpu1.gpu.type",
        "unknown GPU type 'h100'; define it under 'gpu_types' or use one of: (none defined)",
    )


def test_admin_group_unknown():
    d = minimal()
    d["auth"]["admin_groups"] = ["admins", "platform-team"]
    assert only_problem(d) == (
        "auth.admin_groups[1]",
        "unknown group 'platform-team'; define it under 'groups' or use one of: admins, course-x, physics-lab",
    )


def test_demo_user_group_unknown():
    d = minimal()
    d["auth"]["demo_users"]["alice"]["groups"] = ["physics"]
    assert only_problem(d) == (
        "auth.demo_users.alice.groups[0]",
        "unknown group 'physics'; define it under 'groups' or use one of: admins, course-x, physics-lab",
    )


@pytest.mark.parametrize(
    "name, why",
    [
        (
            "ali:ce",
            "the user name 'ali:ce' contains a colon (':'); rename the account (letters, digits, '-', '_', '.', '@')",
        ),
        ("a/b", "the user name 'a/b' contains a slash ('/'); rename the account (letters, digits, '-', '_', '.', '@')"),
        (
            "a\nb",
            "the user name 'a\\nb' contains a control character (0xa); rename the account (letters, digits, '-', '_', '.', '@')",
        ),
        ("Alice", "the hub lowercases and strips user names, so 'Alice' could never log in; write it as 'alice'"),
    ],
)
def test_demo_user_names_must_map_to_accounts(name, why):
    d = minimal()
    d["auth"]["demo_users"][name] = {"groups": ["physics-lab"]}
    assert only_problem(d) == (f"auth.demo_users.{name}", why)


@pytest.mark.parametrize("auth_type", ["github", "generic-oauth"])
def test_demo_users_need_demo_auth(auth_type):
    d = minimal()
    d["auth"]["type"] = auth_type
    # other problems of an incomplete SSO section may be reported too; this one must be
    assert (
        "auth.demo_users",
        f"demo users are only allowed with auth type 'demo', not {auth_type!r}",
    ) in problems_of(d)


def test_instructors_only_in_courses():
    d = minimal()
    d["groups"]["physics-lab"]["instructors"] = ["alice"]
    assert only_problem(d) == ("groups.physics-lab.instructors", "only groups of kind 'course' have instructors")


def test_worker_limits_must_fit_cluster_limits():
    d = minimal()
    d["groups"]["course-x"]["dask"].update(worker_max_cores=3, worker_max_memory="8G")
    assert problems_of(d) == [
        ("groups.course-x.dask.worker_max_cores", "must not exceed dask.max_cores"),
        ("groups.course-x.dask.worker_max_memory", "must not exceed dask.max_memory"),
    ]


def test_memory_limit_below_guarantee():
    d = minimal()
    d["profiles"]["small"]["memory_limit"] = "1G"
    assert only_problem(d) == ("profiles.small.memory_limit", "must be at least 'memory' (the guarantee)")
    d["profiles"]["small"]["memory_limit"] = "2G"
    assert parse_policy(d).profiles["small"].memory_limit == 2 * 10**9


# ---------------------------------------------------------------------------
# Quantities, durations, cores
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512Mi", 536870912),
        ("8G", 8 * 10**9),
        ("1.5Gi", 1610612736),
        ("2Ki", 2048),
        ("3k", 3000),
        ("3K", 3000),
        ("1T", 10**12),
        ("1Ti", 2**40),
        ("7M", 7 * 10**6),
        ("1073741824", 1073741824),
        (" 8G ", 8 * 10**9),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_quantity(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["12 GB", "-1", "8GB", "G", "1.5", "8g", "1e9", "", "8 G"])
def test_parse_quantity_rejects_bad_strings(text):
    if text == "1.5":  # a plain decimal number of bytes is fine
        assert parse_quantity(text) == 1
        return
    with pytest.raises(ValueError) as info:
        parse_quantity(text)
    assert str(info.value) == QUANTITY_HINT + repr(text)


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "must not be negative, got -1"),
        (True, "expected a memory size like 8G or 512Mi, got True"),
        ([8], "expected a memory size like 8G or 512Mi, got [8]"),
        (None, "expected a memory size like 8G or 512Mi, got None"),
    ],
)
def test_parse_quantity_rejects_bad_types(value, message):
    with pytest.raises(ValueError) as info:
        parse_quantity(value)
    assert str(info.value) == message


def test_bad_quantity_in_policy_names_field():
    d = minimal()
    d["profiles"]["small"]["memory"] = "12 GB"
    assert only_problem(d) == ("profiles.small.memory", QUANTITY_HINT + "'12 GB'")


def test_negative_string_quantity_in_policy():
    d = minimal()
    d["groups"]["course-x"]["dask"]["max_memory"] = "-1"
    assert only_problem(d) == ("groups.course-x.dask.max_memory", QUANTITY_HINT + "'-1'")


def test_negative_numeric_quantity_in_policy():
    d = minimal()
    d["profiles"]["small"]["memory"] = -1
    assert only_problem(d) == ("profiles.small.memory", "must not be negative, got -1")


def test_optional_memory_limit_bad_quantity_names_field():
    d = minimal()
    d["profiles"]["small"]["memory_limit"] = "4 GiB"
    assert only_problem(d) == ("profiles.small.memory_limit", QUANTITY_HINT + "'4 GiB'")


@pytest.mark.parametrize(
    "count, message",
    [
        (-1, "Input should be greater than or equal to 1"),
        (0, "Input should be greater than or equal to 1"),
        (17, "Input should be less than or equal to 16"),
    ],
)
def test_gpu_count_bounds(count, message):
    d = minimal()
    d["profiles"]["gpu1"]["gpu"]["count"] = count
    assert only_problem(d) == ("profiles.gpu1.gpu.count", message)


@pytest.mark.parametrize(
    "text, expected",
    [("8h", 28800), ("15m", 900), (90, 90), ("90", 90), ("30s", 30), ("2d", 172800), ("1.5h", 5400), (0, 0)],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("value", ["8 hours", "8H", "1w", "h", "", "-5m", None, True, [1]])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) in (DURATION_HINT + repr(value), f"expected a duration like 30m or 8h, got {value!r}")


def test_parse_duration_negative_number():
    with pytest.raises(ValueError, match=r"^must not be negative, got -5$"):
        parse_duration(-5)


def test_bad_duration_in_policy_names_field():
    d = minimal()
    d["culling"] = {"timeout": "8 hours"}
    d["groups"]["course-x"]["session"] = {"max_age": "1 day"}
    assert problems_of(d) == [
        ("culling.timeout", DURATION_HINT + "'8 hours'"),
        ("groups.course-x.session.max_age", DURATION_HINT + "'1 day'"),
    ]


@pytest.mark.parametrize(
    "fn, text, expected",
    [
        (parse_quantity, "2.01G", 2_010_000_000),
        (parse_duration, "4.1h", 14_760),
    ],
)
def test_decimal_quantities_are_exact(fn, text, expected):
    assert fn(text) == expected


@pytest.mark.parametrize("cpu, expected", [("500m", 0.5), (2, 2.0), (0.25, 0.25), ("1.5", 1.5), ("250m", 0.25)])
def test_cpu_values(cpu, expected):
    d = minimal()
    d["profiles"]["small"]["cpu"] = cpu
    assert parse_policy(d).profiles["small"].cpu == expected


@pytest.mark.parametrize(
    "cpu, message",
    [
        (0, "must be more than 0 cores, got 0"),
        (-2, "must be more than 0 cores, got -2"),
        ("0m", "must be more than 0 cores, got 0.0"),
        ("two", "expected a number of cores like 2 or 0.5 or 500m, got 'two'"),
        (True, "expected a number of cores like 2 or 0.5, got True"),
        (None, "expected a number of cores like 2 or 0.5, got None"),
    ],
)
def test_cpu_rejected(cpu, message):
    d = minimal()
    d["profiles"]["small"]["cpu"] = cpu
    assert only_problem(d) == ("profiles.small.cpu", message)


@pytest.mark.parametrize("cpu", [float("nan"), float("inf"), "nan"])
def test_cpu_rejects_nan_and_inf(cpu):
    d = minimal()
    d["profiles"]["small"]["cpu"] = cpu
    with pytest.raises(PolicyError):
        parse_policy(d)


def test_dask_cores_zero_rejected():
    d = minimal()
    d["groups"]["course-x"]["dask"]["max_cores"] = 0
    assert problems_of(d)[0] == ("groups.course-x.dask.max_cores", "must be more than 0 cores, got 0")


# ---------------------------------------------------------------------------
# Names, literals
# ---------------------------------------------------------------------------

NAME_HINT = "names must be lowercase letters, digits and '-' (like a DNS label), at most 63 characters"


@pytest.mark.parametrize("name", ["Physics", "physics_lab", "-lab", "lab-", "lab.x", "UPPER"])
def test_bad_group_names(name):
    d = minimal()
    d["groups"][name] = {"kind": "research"}
    path, msg = only_problem(d)
    assert msg == NAME_HINT
    assert path.startswith(f"groups.{name}")


def test_group_name_too_long():
    d = minimal()
    name = "a" * 64
    d["groups"][name] = {"kind": "research"}
    path, msg = only_problem(d)
    assert path.startswith(f"groups.{name}")
    assert msg == "String should have at most 63 characters"


def test_bad_profile_name():
    d = minimal()
    d["profiles"]["GPU"] = {}
    path, msg = only_problem(d)
    assert path.startswith("profiles.GPU")
    assert msg == NAME_HINT


def test_good_group_names():
    d = minimal()
    for name in ["a", "lab2", "ml-101", "a" * 63]:
        d["groups"][name] = {"kind": "research"}
    assert set(parse_policy(d).groups) >= {"a", "lab2", "ml-101", "a" * 63}


def test_wrong_kind_literal():
    d = minimal()
    d["groups"]["physics-lab"]["kind"] = "lab"
    assert only_problem(d) == (
        "groups.physics-lab.kind",
        "Input should be 'research', 'course', 'startup' or 'admin', got 'lab'",
    )


def test_wrong_auth_type_literal():
    d = minimal()
    d["auth"]["type"] = "ldap"
    assert only_problem(d) == ("auth.type", "Input should be 'demo', 'generic-oauth' or 'github', got 'ldap'")


def test_wrong_budget_period():
    d = minimal()
    d["groups"]["physics-lab"]["budget"] = {"gpu_hours": 10, "period": "year"}
    assert only_problem(d) == (
        "groups.physics-lab.budget.period",
        "Input should be 'month', 'term' or 'total', got 'year'",
    )


# ---------------------------------------------------------------------------
# Top level, files, aggregation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, tname", [([1, 2], "list"), ("text", "str"), (3, "int")])
def test_top_level_not_a_mapping(data, tname):
    assert only_problem(data) == ("", f"expected a mapping at the top level, got {tname}")


def test_top_level_problem_rendered_as_top_level():
    with pytest.raises(PolicyError) as info:
        parse_policy([1], source="p.yaml")
    assert str(info.value) == (
        "p.yaml: invalid platform policy (1 problem)\n  - <top level>: expected a mapping at the top level, got list"
    )


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ngroups:\n  a: {kind: research\n  b: 1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.source == str(f)
    [(path, msg)] = info.value.problems
    assert path == ""
    assert msg.startswith("not valid YAML at line 4, column ")
    assert str(info.value).startswith(
        f"{f}: invalid platform policy (1 problem)\n  - <top level>: not valid YAML at line 4"
    )


def test_yaml_unclosed_list(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ngroups:\n  a: [1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.problems == [
        ("", "not valid YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'")
    ]


def test_missing_file(tmp_path):
    f = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.problems == [("", "file not found; pass --config with the path to a platform YAML")]
    assert str(info.value) == (
        f"{f}: invalid platform policy (1 problem)\n"
        "  - <top level>: file not found; pass --config with the path to a platform YAML"
    )


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [(path, msg)] = info.value.problems
    assert path == ""
    assert msg == "cannot read file: Is a directory"


def test_load_policy_non_mapping_file(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert info.value.problems == [("", "expected a mapping at the top level, got list")]


def test_load_policy_round_trip_of_minimal(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(minimal()))
    assert load_policy(f) == parse_policy(minimal())


def test_multiple_schema_problems_reported_together():
    d = minimal()
    d["nmae"] = 1
    d["groups"]["physics-lab"]["dask"]["max_coress"] = 3
    d["profiles"]["small"]["memory"] = "12 GB"
    d["groups"]["admins"]["kind"] = "boss"
    with pytest.raises(PolicyError) as info:
        parse_policy(d, source="p.yaml")
    problems = info.value.problems
    assert sorted(problems) == sorted(
        [
            ("nmae", UNKNOWN_KEY),
            ("groups.physics-lab.dask.max_coress", UNKNOWN_KEY),
            ("profiles.small.memory", QUANTITY_HINT + "'12 GB'"),
            ("groups.admins.kind", "Input should be 'research', 'course', 'startup' or 'admin', got 'boss'"),
        ]
    )
    text = str(info.value)
    assert text.startswith("p.yaml: invalid platform policy (4 problems)\n")
    assert text.count("\n  - ") == 4


def test_multiple_reference_problems_reported_together():
    d = minimal()
    d["groups"]["physics-lab"]["profiles"] = ["nope"]
    d["profiles"]["small"]["image"] = "missing"
    d["auth"]["admin_groups"] = ["ghosts"]
    d["auth"]["demo_users"]["alice"]["groups"] = ["phantom"]
    problems = problems_of(d)
    assert [p for p, _ in problems] == [
        "profiles.small.image",
        "groups.physics-lab.profiles[0]",
        "auth.admin_groups[0]",
        "auth.demo_users.alice.groups[0]",
    ]


def test_policy_error_is_value_error():
    err = PolicyError("s", [("a.b", "bad"), ("", "worse")])
    assert isinstance(err, ValueError)
    assert err.problems == [("a.b", "bad"), ("", "worse")]
    assert str(err) == "s: invalid platform policy (2 problems)\n  - a.b: bad\n  - <top level>: worse"


# ---------------------------------------------------------------------------
# Pure queries
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Policy:
    return load_policy(DEMO)


def test_groups_of_policy_order_and_filters_unknown(demo):
    assert demo.groups_of(["platform-admins", "nobody", "physics-lab"]) == ["physics-lab", "platform-admins"]
    assert demo.groups_of([]) == []
    assert demo.groups_of(iter(["course-ml101"])) == ["course-ml101"]


def test_profiles_for(demo):
    assert demo.profiles_for(["physics-lab"]) == ["cpu-large", "h100-x1"]
    assert demo.profiles_for(["course-ml101"]) == ["cpu-small", "mig-1g"]
    # union, in policy (profiles section) order
    assert demo.profiles_for(["startup-acme", "physics-lab"]) == ["cpu-small", "cpu-large", "h100-x1"]
    assert demo.profiles_for(["unknown"]) == []
    assert demo.profiles_for([]) == []


def test_primary_group(demo):
    assert demo.primary_group(["platform-admins", "course-ml101"]) == "course-ml101"
    assert demo.primary_group(["x"]) is None
    assert demo.primary_group([]) is None


def test_dask_policy_for_most_generous(demo):
    assert demo.dask_policy_for(["course-ml101"]).max_cores == 2
    both = demo.dask_policy_for(["course-ml101", "physics-lab"])
    assert both is demo.groups["physics-lab"].dask
    assert demo.dask_policy_for(["physics-lab", "course-ml101"]) is demo.groups["physics-lab"].dask
    assert demo.dask_policy_for(["platform-admins"]) is None
    assert demo.dask_policy_for([]) is None
    # admins + a dask group: the dask group's policy
    assert demo.dask_policy_for(["platform-admins", "startup-acme"]) is demo.groups["startup-acme"].dask


def test_dask_policy_tie_on_cores_broken_by_memory():
    d = minimal()
    d["groups"]["course-x"]["dask"] = {
        "max_cores": 8,
        "max_memory": "64G",
        "max_workers": 1,
        "worker_max_cores": 1,
        "worker_max_memory": "1G",
    }
    p = parse_policy(d)
    assert p.dask_policy_for(["physics-lab", "course-x"]).max_memory == 64 * 10**9


def test_kinds_of(demo):
    assert demo.kinds_of(["platform-admins", "physics-lab"]) == ["research", "admin"]
    assert demo.kinds_of(["course-ml101", "startup-acme"]) == ["course", "startup"]
    assert demo.kinds_of(["nope"]) == []


def test_policy_is_frozen(demo):
    with pytest.raises(pydantic.ValidationError):
        demo.name = "other"
    with pytest.raises(pydantic.ValidationError):
        demo.groups["physics-lab"].kind = "course"
    with pytest.raises(pydantic.ValidationError):
        demo.profiles["cpu-small"].cpu = 64
    with pytest.raises(pydantic.ValidationError):
        demo.groups["physics-lab"].dask.max_workers = 1000
    assert demo.name == "Workbench demo"


def test_parse_policy_does_not_mutate_input():
    d = minimal()
    before = copy.deepcopy(d)
    parse_policy(d)
    assert d == before
