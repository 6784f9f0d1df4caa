"""Budgets, per-user budgets and concurrency caps in the platform policy: validation with field paths."""

from __future__ import annotations

import copy

import pytest

from tests.quota_support import quota_policy_data
from workbench.policy import PolicyError, parse_policy


def problems(data) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    return info.value.problems


def test_quota_policy_is_valid():
    p = parse_policy(quota_policy_data())
    lab = p.groups["physics-lab"]
    assert lab.budget.per_user.gpu_hours == 300 and lab.budget.per_user.cpu_hours is None
    assert lab.caps.running_gpus == 5 and lab.caps.running_servers is None
    assert p.groups["course-ml101"].budget.term_starts == ["02-01", "09-01"]
    assert p.groups["startup-acme"].budget.period == "total"


def test_budget_defaults():
    data = quota_policy_data()
    data["groups"]["physics-lab"]["budget"] = {"gpu_hours": 10}
    b = parse_policy(data).groups["physics-lab"].budget
    assert (b.period, b.term_starts, b.per_user, b.cpu_hours) == ("month", ["02-01", "09-01"], None, None)
    assert (b.warn_at, b.grace) == ([0.8, 0.95], 15 * 60)  # warned at 80% and 95%; 15 minutes once spent


@pytest.mark.parametrize(
    "patch, path, words",
    [
        ({"budget": {"gpu_hours": -1}}, "groups.physics-lab.budget.gpu_hours", "greater than or equal to 0"),
        ({"budget": {"period": "week"}}, "groups.physics-lab.budget.period", "'month', 'term' or 'total'"),
        ({"budget": {"term_starts": ["9-1"]}}, "groups.physics-lab.budget.term_starts[0]", "'MM-DD'"),
        ({"budget": {"term_starts": ["02-30"]}}, "groups.physics-lab.budget.term_starts[0]", "day 01-28"),
        ({"budget": {"term_starts": []}}, "groups.physics-lab.budget.term_starts", "at least 1"),
        ({"budget": {"per_user": {"gpu_hour": 1}}}, "groups.physics-lab.budget.per_user.gpu_hour", "unknown key"),
        ({"budget": {"gpu_hour": 1}}, "groups.physics-lab.budget.gpu_hour", "unknown key"),
        ({"caps": {"running_gpus": -2}}, "groups.physics-lab.caps.running_gpus", "greater than or equal to 0"),
        ({"caps": {"max_servers": 2}}, "groups.physics-lab.caps.max_servers", "unknown key"),
        ({"caps": {"user_running_servers": "many"}}, "groups.physics-lab.caps.user_running_servers", "integer"),
        ({"budget": {"warn_at": [80]}}, "groups.physics-lab.budget.warn_at", "fraction between 0 and 1"),
        ({"budget": {"warn_at": [0.95, 0.8]}}, "groups.physics-lab.budget.warn_at", "increasing order"),
        ({"budget": {"grace": "soon"}}, "groups.physics-lab.budget.grace", "duration like"),
    ],
)
def test_errors_name_the_path(patch, path, words):
    data = copy.deepcopy(quota_policy_data())
    group = data["groups"]["physics-lab"]
    for key, value in patch.items():
        group[key] = {**group.get(key, {}), **value}
    found = problems(data)
    assert any(p == path and words in m for p, m in found), found
