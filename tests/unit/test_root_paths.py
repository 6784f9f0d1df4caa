"""Unit tests of root's file handling in users' folders: sysusers.create_file_at / ensure_folder /
root_controlled, spawn.starters.install_starters and runtime.make_private_state_dir.

Each test plays a user who put a symlink where root would write, and checks that the symlink's
target is untouched. The integration tests (tests/integration/test_isolation_os.py) do the same
through the real workbench with real accounts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from workbench.runtime import make_private_state_dir
from workbench.spawn.starters import install_starters
from workbench.sysusers import create_file_at, ensure_folder, open_dir_nofollow, root_controlled

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership checks)")


def _victim(tmp_path: Path) -> Path:
    target = tmp_path / "victim"
    target.mkdir()
    (target / "shadow").write_text("root:secret\n")
    os.chmod(target / "shadow", 0o640)
    return target


def test_create_file_at_never_follows_a_symlink(tmp_path):
    victim = _victim(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dangling").symlink_to(victim / "new-file")
    (home / "existing").symlink_to(victim / "shadow")
    fd = open_dir_nofollow(home)
    try:
        assert create_file_at(fd, "dangling", b"x") is False
        assert create_file_at(fd, "existing", b"x") is False
        assert create_file_at(fd, "fresh", b"hello") is True
        with pytest.raises(ValueError, match="not a plain file name"):
            create_file_at(fd, "../escape", b"x")
    finally:
        os.close(fd)
    assert not (victim / "new-file").exists()
    assert (victim / "shadow").read_text() == "root:secret\n"
    assert (home / "fresh").read_bytes() == b"hello"


def test_open_dir_nofollow_refuses_a_symlinked_folder(tmp_path):
    (tmp_path / "link").symlink_to(_victim(tmp_path))
    with pytest.raises(OSError):
        open_dir_nofollow(tmp_path / "link")


def test_starters_not_written_through_symlinks(tmp_path):
    victim = _victim(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "exercise-1.ipynb").symlink_to(victim / "created-by-root")
    (home / "platform-tour.ipynb").symlink_to(victim / "shadow")
    assert install_starters(home, ["course", "admin"]) == []
    assert sorted(os.listdir(victim)) == ["shadow"]
    assert (victim / "shadow").read_text() == "root:secret\n"


def test_starters_refuse_a_home_that_is_a_symlink(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / "home").symlink_to(victim)
    with pytest.raises(OSError):
        install_starters(tmp_path / "home", ["course"])
    assert sorted(os.listdir(victim)) == ["shadow"]


@as_root
def test_starters_chowned_through_the_descriptor(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert install_starters(home, ["course"], uid=65534, gid=65534) == ["exercise-1.ipynb"]
    st = os.lstat(home / "exercise-1.ipynb")
    assert (st.st_uid, st.st_gid) == (65534, 65534)


@as_root
def test_root_controlled_names_the_folder_others_could_change(tmp_path):
    tmp_path.chmod(0o755)
    assert root_controlled(tmp_path) == (True, "")
    mine = tmp_path / "users"
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    assert root_controlled(mine / ".") == (False, str(mine))
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    assert root_controlled(shared) == (False, str(shared))
    shared.chmod(0o1777)  # sticky, like /tmp
    assert root_controlled(shared) == (True, "")


@as_root
def test_ensure_folder_refuses_below_a_user_writable_folder(tmp_path):
    tmp_path.chmod(0o755)
    users = tmp_path / "users"
    users.mkdir()
    os.chown(users, 65534, 65534)
    (users / "group").symlink_to(_victim(tmp_path))
    with pytest.raises(RuntimeError) as info:
        ensure_folder(users / "group", 0o2770, 65534)
    assert f"{users} is owned or writable by someone other than root" in str(info.value)
    assert "choose another path in the policy" in str(info.value)
    victim = tmp_path / "victim"
    assert os.lstat(victim).st_uid == 0 and stat.S_IMODE(os.lstat(victim).st_mode) != 0o2770


@as_root
def test_ensure_folder_sets_owner_and_mode_and_traversable_parents_under_umask_077(tmp_path):
    tmp_path.chmod(0o755)
    old = os.umask(0o077)  # what `workbench up` runs the hub with
    try:
        p = ensure_folder(tmp_path / "srv" / "groups" / "lab", 0o2770, 65534)
    finally:
        os.umask(old)
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 65534, 0o2770)
    assert stat.S_IMODE(os.lstat(tmp_path / "srv").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(tmp_path / "srv" / "groups").st_mode) == 0o755


def test_private_state_dir_tightens_an_older_state(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    state.chmod(0o711)
    (state / "jupyterhub.sqlite").write_text("db")
    (state / "jupyterhub.sqlite").chmod(0o644)
    (state / "logs" / "hub.log").write_text("log")
    (state / "logs" / "hub.log").chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o644)
    (state / "link").symlink_to(outside)
    make_private_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "jupyterhub.sqlite").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "logs" / "hub.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a symlink is not followed
