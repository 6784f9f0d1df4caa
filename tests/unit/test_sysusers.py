"""Unit tests of workbench.sysusers: hub name -> Unix name mapping, path reachability checks."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

import pytest

from workbench.sysusers import others_can_execute, system_username

UNIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]*$")


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:6]


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
        ("Jane.Doe@uni.example", "wb-jane-doe-uni-example-" + digest("Jane.Doe@uni.example")),
        ("Alice", "wb-alice-" + digest("Alice")),
        ("a b", "wb-a-b-" + digest("a b")),
        ("", "wb-user-" + digest("")),
        ("@@@", "wb-user-" + digest("@@@")),
        ("-x-", "wb-x-" + digest("-x-")),
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
    assert long == "wb-" + "x" * 22 + "-" + digest("x" * 30)
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
