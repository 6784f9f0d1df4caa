"""Unit tests of workbench.sysusers: hub name -> Unix name mapping (property-based with hypothesis: injective,
disjoint from every group name, always a valid useradd name), refused hub names, stale group memberships, path
reachability checks."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from workbench.sysusers import (
    GROUP_PREFIX,
    INSTRUCTOR_GROUP_PREFIX,
    hub_username_problem,
    others_can_execute,
    stale_groups,
    system_username,
    unix_group_name,
)

#: useradd's rule on Debian (shadow's is_valid_user_name, no trailing $) and its 32-character limit
UNIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
#: policy group names (workbench.policy.Name)
GROUP_NAMES = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
#: hub names that look like the group namespaces, or are close to them
TRICKY = st.sampled_from(
    ["g-physics-lab", "i-course-ml101", "G-physics-lab", "g", "i", "G", "g-", "-g-x", "wb-g-x", "u-x", "ug-x", "a"]
)
HUB_NAMES = st.one_of(st.text(max_size=80), st.from_regex(r"\A[a-z0-9_.@-]{0,40}\Z"), TRICKY)


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:10]


@pytest.mark.parametrize(
    "hub, unix",
    [
        ("alice", "wb-alice"),
        ("admin", "wb-admin"),
        ("student1", "wb-student1"),
        ("jane_doe", "wb-jane_doe"),
        ("ml-101", "wb-ml-101"),
    ],
)
def test_plain_names_keep_their_name(hub, unix):
    assert system_username(hub) == unix


def test_prefix():
    assert system_username("alice", prefix="lab-") == "lab-alice"
    assert system_username("alice", prefix="") == "alice"


@pytest.mark.parametrize(
    "hub, unix",
    [
        ("Jane.Doe@uni.example", "wb-jane-doe-uni-examp-" + digest("Jane.Doe@uni.example")),
        ("Alice", "wb-alice-" + digest("Alice")),
        ("a b", "wb-ua-b-" + digest("a b")),
        ("", "wb-user-" + digest("")),
        ("@@@", "wb-user-" + digest("@@@")),
        ("-x-", "wb-ux-" + digest("-x-")),
        ("X", "wb-ux-" + digest("X")),
        ("ab-" + "0" * 10, "wb-ab-0000000000-" + digest("ab-" + "0" * 10)),
    ],
)
def test_names_needing_sanitising_get_hash_suffix(hub, unix):
    assert system_username(hub) == unix


def test_distinct_inputs_distinct_outputs():
    names = [
        "alice",
        "Alice",
        "ALICE",
        "a.lice",
        "a-lice",
        "a_lice",
        "a lice",
        "jane.doe",
        "jane-doe",
        "jane@doe",
        "x" * 40,
        "x" * 41,
        "x" * 29 + "a",
        "x" * 29 + "b",
        "",
        "user",
        "é",
        "e",
    ]
    out = [system_username(n) for n in names]
    assert len(set(out)) == len(names), dict(zip(names, out))


@pytest.mark.parametrize(
    "hub",
    ["x" * 29, "x" * 30, "x" * 100, "Very.Long.Name.Of.Someone@a-really-long-university-domain.example", "ü" * 50],
)
def test_at_most_32_chars_and_valid(hub):
    name = system_username(hub)
    assert len(name) <= 32
    assert UNIX_NAME.match(name), name
    assert name.startswith("wb-")


def test_exactly_32_chars_stays_plain_and_33_is_hashed():
    assert system_username("x" * 29) == "wb-" + "x" * 29  # 32 characters
    long = system_username("x" * 30)
    assert long == "wb-" + "x" * 18 + "-" + digest("x" * 30)
    assert len(long) == 32


def test_deterministic():
    assert system_username("Jane.Doe@uni.example") == system_username("Jane.Doe@uni.example")


# ---------------------------------------------------------------------------
# others_can_execute (under /tmp: pytest's tmp_path has a 0700 parent)
# ---------------------------------------------------------------------------


@pytest.fixture
def tmpdir_in_tmp():
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_dir_0755_reachable(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o755)
    assert others_can_execute(tmpdir_in_tmp) == (True, "")


def test_dir_0711_reachable(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o711)
    assert others_can_execute(tmpdir_in_tmp) == (True, "")


def test_dir_0700_blocks(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o700)
    assert others_can_execute(tmpdir_in_tmp) == (False, os.path.realpath(tmpdir_in_tmp))


def test_file_inside_0700_dir_names_the_dir(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o700)
    sub = os.path.join(tmpdir_in_tmp, "a", "b")
    os.makedirs(sub)
    os.chmod(os.path.join(tmpdir_in_tmp, "a"), 0o755)
    os.chmod(sub, 0o755)
    exe = os.path.join(sub, "python")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    assert others_can_execute(exe) == (False, os.path.realpath(tmpdir_in_tmp))


def test_nested_blocker_is_reported(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o755)
    blocked = os.path.join(tmpdir_in_tmp, "private")
    os.makedirs(os.path.join(blocked, "bin"))
    os.chmod(blocked, 0o750)
    assert others_can_execute(os.path.join(blocked, "bin")) == (False, os.path.realpath(blocked))


def test_file_not_executable(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o755)
    f = os.path.join(tmpdir_in_tmp, "data")
    with open(f, "w") as fh:
        fh.write("x")
    os.chmod(f, 0o644)
    assert others_can_execute(f) == (False, os.path.realpath(f))
    os.chmod(f, 0o755)
    assert others_can_execute(f) == (True, "")


def test_symlink_resolved(tmpdir_in_tmp):
    os.chmod(tmpdir_in_tmp, 0o755)
    private = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(private, 0o700)
        link = os.path.join(tmpdir_in_tmp, "link")
        os.symlink(private, link)
        assert others_can_execute(link) == (False, os.path.realpath(private))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_plain_name_cannot_collide_with_hashed_name():
    other = "a.b"
    crafted = "a-b-" + digest(other)  # a valid plain name, kept as is
    assert system_username(crafted) != system_username(other)


# ---------------------------------------------------------------------------
# Namespaces: users and groups never meet (issue 10)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hub, unix",
    [
        ("g-physics-lab", "wb-ug-physics-lab-" + digest("g-physics-lab")),
        ("i-course-ml101", "wb-ui-course-ml101-" + digest("i-course-ml101")),
        ("g", "wb-g"),  # plain: no group is named "wb-g"
    ],
)
def test_names_shaped_like_group_namespaces_are_escaped(hub, unix):
    assert system_username(hub) == unix


def test_group_names():
    assert unix_group_name("physics-lab") == "wb-g-physics-lab"
    assert unix_group_name("course-ml101", INSTRUCTOR_GROUP_PREFIX) == "wb-i-course-ml101"
    long = "x" * 40
    assert unix_group_name(long) == "wb-g-" + "x" * 16 + "-" + digest(long)


@given(HUB_NAMES)
def test_every_user_name_is_a_valid_useradd_name_outside_group_namespaces(hub):
    name = system_username(hub)
    assert UNIX_NAME.match(name), name
    assert name.startswith("wb-")
    assert not re.match(r"^wb-[a-z]-", name), name
    assert not name.startswith((GROUP_PREFIX, INSTRUCTOR_GROUP_PREFIX))


@given(HUB_NAMES, HUB_NAMES)
def test_user_mapping_is_injective(a, b):
    assume(a != b)
    assert system_username(a) != system_username(b)


@given(HUB_NAMES, GROUP_NAMES)
def test_no_user_name_is_a_group_name(hub, group):
    user = system_username(hub)
    assert user != unix_group_name(group)
    assert user != unix_group_name(group, INSTRUCTOR_GROUP_PREFIX)


@given(GROUP_NAMES, GROUP_NAMES)
def test_group_mapping_is_injective_and_namespaces_are_disjoint(a, b):
    for name in (unix_group_name(a), unix_group_name(a, INSTRUCTOR_GROUP_PREFIX)):
        assert UNIX_NAME.match(name), name
    assert unix_group_name(a) != unix_group_name(b, INSTRUCTOR_GROUP_PREFIX)
    if a != b:
        assert unix_group_name(a) != unix_group_name(b)
        assert unix_group_name(a, INSTRUCTOR_GROUP_PREFIX) != unix_group_name(b, INSTRUCTOR_GROUP_PREFIX)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "the user name is empty"),
        ("  ", "the user name is empty"),
        ("a:b", "the user name 'a:b' contains a colon (':')"),
        ("a/b", "the user name 'a/b' contains a slash ('/')"),
        ("a\\b", "the user name 'a\\\\b' contains a backslash ('\\\\')"),
        ("a\nb", "the user name 'a\\nb' contains a control character (0xa)"),
        ("..", "the user name '..' is only dots"),
        ("x" * 256, "the user name is 256 characters long; at most 255 are allowed"),
    ],
)
def test_refused_hub_names(name, problem):
    assert hub_username_problem(name) == problem


@pytest.mark.parametrize("name", ["researcher", "Jane.Doe@uni.example", "g-physics-lab", "a b", "é"])
def test_accepted_hub_names(name):
    assert hub_username_problem(name) is None


def test_stale_groups_are_the_managed_ones_not_wanted():
    current = ["wb-g-physics-lab", "wb-g-course-ml101", "wb-i-course-ml101", "docker", "wb-researcher", "users"]
    assert stale_groups(current, ["wb-g-physics-lab"]) == ["wb-g-course-ml101", "wb-i-course-ml101"]
    assert stale_groups(current, ["wb-g-physics-lab", "wb-g-course-ml101", "wb-i-course-ml101"]) == []
