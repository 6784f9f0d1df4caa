"""Course material end to end: a real hub pulls a git repository (served by `git daemon`) into every
member's home at spawn with nbgitpuller, keeps students' edits across upstream changes, survives a
broken repository, gives the course's materials folder to its instructors, loads rosters through
the hub's REST API and serves `workbench course link` through the proxy.

The policy is demo.yaml with the course's material pointing at the test's repository and with
accounts of its own (cm-*), so that homes of other tests' demo users are never touched.
"""

from __future__ import annotations

import grp
import json
import pwd
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml

from workbench.cli.main import main
from workbench.courses.material import NOTE_NAME
from workbench.sysusers import USER_PREFIX

from .harness import DEMO, Workbench, free_port, state_dir

pytestmark = pytest.mark.integration


def token_file(token: str) -> str:
    """A private (0600) file holding ``token``, for ``workbench course ... --token-file``."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="wb-token-")
    with open(fd, "w") as f:
        f.write(token)
    return path


COURSE = "course-ml101"
EXERCISE = "# Exercise 1\n\nWhat is 6 x 7?\n\nanswer: ...\n"


def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=Instructor", "-c", "user.email=i@uni.example", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def commit_and_push(work: Path, message: str) -> None:
    git("add", "-A", cwd=work)
    git("commit", "-qm", message, cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)


class Env:
    """The test's workbench, its material repository and where things are."""

    def __init__(self):
        state = state_dir()
        self.root = state.parent
        bare = self.root / "material.git"
        git("init", "-q", "--bare", "-b", "main", str(bare), cwd=self.root)
        self.upstream = self.root / "upstream"
        git("clone", "-q", str(bare), str(self.upstream), cwd=self.root)
        (self.upstream / "exercise.md").write_text(EXERCISE)
        (self.upstream / "README.md").write_text("ML 101 material\n")
        commit_and_push(self.upstream, "week 1")
        # a real remote (the users' accounts cannot read root's repository directly: git's ownership check)
        port = free_port()
        self.daemon = subprocess.Popen(
            [
                "git",
                "daemon",
                "--export-all",
                "--reuseaddr",
                f"--base-path={self.root}",
                "--listen=127.0.0.1",
                f"--port={port}",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.repo_url = f"git://127.0.0.1:{port}/material.git"
        self.bare = bare

        policy = yaml.safe_load(DEMO.read_text())
        policy["auth"]["demo_users"] = {
            "cm-teacher": {"groups": [COURSE]},
            "cm-student1": {"groups": [COURSE]},
            "cm-student2": {"groups": [COURSE]},
            "cm-admin": {"groups": ["platform-admins"]},
        }
        policy["groups"][COURSE]["instructors"] = ["cm-teacher"]
        policy["groups"][COURSE]["material"] = {"git": self.repo_url, "branch": "main"}
        policy.setdefault("storage", {})["courses"] = str(self.root / "courses" / "{course}")
        self.config = self.root / "platform.yaml"
        self.config.write_text(yaml.safe_dump(policy))
        self.materials = self.root / "courses" / COURSE

        self.wb = Workbench(state, config=self.config)
        for name in self.wb_names():
            try:  # left by an earlier run of this test
                shutil.rmtree(Path(pwd.getpwnam(f"{USER_PREFIX}{name}").pw_dir) / COURSE)
            except (KeyError, FileNotFoundError):
                pass

    @staticmethod
    def wb_names():
        return ("cm-teacher", "cm-student1", "cm-student2")

    def home(self, user: str) -> Path:
        return self.wb.home(user)

    def token(self, user: str) -> str:
        return self.wb.new_token(self.wb.login(user), user)

    def close(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait(timeout=30)


@pytest.fixture(scope="module")
def env():
    e = Env()
    try:
        e.wb.start()
        yield e
        assert e.wb.stop() == 0
        assert not e.wb.leftovers()
    finally:
        e.wb.stop()
        e.close()


def contents(env: Env, token: str, user: str, path: str, method: str = "GET", **kw) -> requests.Response:
    return requests.request(
        method,
        f"{env.wb.url}/user/{user}/api/contents/{path}",
        headers={"Authorization": f"token {token}"},
        timeout=30,
        **kw,
    )


def test_material_is_pulled_at_spawn_and_the_students_edits_survive_upstream_changes(env):
    wb, token = env.wb, env.token("cm-student1")
    wb.start_server(token, "cm-student1")
    folder = env.home("cm-student1") / COURSE
    assert (folder / "exercise.md").read_text() == EXERCISE
    # pulled as the student's own account
    assert (folder / "exercise.md").stat().st_uid == pwd.getpwnam(f"{USER_PREFIX}cm-student1").pw_uid
    assert "Course material for" in wb.hub_log()

    # the student answers, through their server
    answered = EXERCISE.replace("answer: ...", "answer: 42")
    r = contents(
        env,
        token,
        "cm-student1",
        f"{COURSE}/exercise.md",
        "PUT",
        json={"type": "file", "format": "text", "content": answered},
    )
    assert r.status_code in (200, 201), r.text
    # meanwhile the instructor improves the exercise and adds week 2
    (env.upstream / "exercise.md").write_text(EXERCISE.replace("# Exercise 1", "# Exercise 1 (multiplication)"))
    (env.upstream / "week2.md").write_text("# Week 2\n")
    commit_and_push(env.upstream, "week 2")

    wb.stop_server(token, "cm-student1")
    wb.start_server(token, "cm-student1")
    assert (folder / "exercise.md").read_text() == "# Exercise 1 (multiplication)\n\nWhat is 6 x 7?\n\nanswer: 42\n"
    assert (folder / "week2.md").read_text() == "# Week 2\n"
    assert not (folder / NOTE_NAME).exists()
    r = contents(env, token, "cm-student1", f"{COURSE}/week2.md")
    assert r.status_code == 200 and r.json()["content"] == "# Week 2\n"


def test_a_broken_repository_leaves_a_note_and_the_server_starts_anyway(env):
    wb, token = env.wb, env.token("cm-student2")
    hidden = env.bare.with_name("material-hidden.git")
    env.bare.rename(hidden)
    try:
        wb.start_server(token, "cm-student2")
    finally:
        hidden.rename(env.bare)
    note = env.home("cm-student2") / COURSE / NOTE_NAME
    text = note.read_text()
    assert text.startswith(f"The course material of {COURSE} could not be updated when your server started")
    assert f"Material: {env.repo_url} (branch main)" in text
    assert f"git cannot read {env.repo_url}: fatal: remote error: " in text  # git's own words
    assert "course(s) not updated (the server starts anyway)" in wb.hub_log()
    r = contents(env, token, "cm-student2", f"{COURSE}/{NOTE_NAME}")
    assert r.status_code == 200  # the student sees it in JupyterLab
    wb.stop_server(token, "cm-student2")


def test_the_materials_folder_is_writable_by_instructors_only(env):
    wb = env.wb
    teacher = env.token("cm-teacher")
    wb.start_server(teacher, "cm-teacher")
    try:
        assert (env.home("cm-teacher") / COURSE / "exercise.md").exists()  # instructors get the material too
        st = env.materials.stat()
        group = grp.getgrgid(st.st_gid)
        assert group.gr_name == f"{USER_PREFIX}i-course-ml101"
        assert stat.S_IMODE(st.st_mode) == 0o2775
        assert f"{USER_PREFIX}cm-teacher" in group.gr_mem and f"{USER_PREFIX}cm-student1" not in group.gr_mem

        from jupyterhub.spawner import set_user_setuid

        def write_as(account: str, name: str) -> int:
            return subprocess.run(
                ["sh", "-c", f"echo notes > {env.materials / name}"],
                preexec_fn=set_user_setuid(account),
                capture_output=True,
                check=False,
            ).returncode

        assert write_as(f"{USER_PREFIX}cm-teacher", "slides.md") == 0
        assert write_as(f"{USER_PREFIX}cm-student1", "cheat.md") != 0
        assert (
            subprocess.run(
                ["cat", str(env.materials / "slides.md")],
                preexec_fn=set_user_setuid(f"{USER_PREFIX}cm-student1"),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            == "notes\n"
        )
    finally:
        wb.stop_server(teacher, "cm-teacher")


def add_students(env: Env, token: str, roster: Path, capsys) -> tuple[int, str, str]:
    rc = main(
        [
            "course",
            "add-students",
            COURSE,
            str(roster),
            "--hub-url",
            env.wb.url,
            "--token-file",
            token_file(token),
            "--config",
            str(env.config),
        ]
    )
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_roster_with_one_bad_row_applies_nothing_then_a_good_one_adds_the_students(env, capsys):
    wb, admin = env.wb, env.token("cm-admin")
    members = lambda: sorted(wb.token_api(admin, "GET", f"/groups/{COURSE}").json()["users"])
    before = members()
    roster = env.root / "roster.csv"
    roster.write_text(
        "username,email,name\ncm-new1,new1@uni.example,New One\ncm-new2,,New Two\n"
        "New Three,new3@uni.example,New Three\n"
    )
    rc, out, err = add_students(env, admin, roster, capsys)
    assert rc == 2, out + err
    assert "line 4: username 'New Three' has a space" in err and "nothing was changed" in err
    assert wb.token_api(admin, "GET", "/users/cm-new1").status_code == 404
    assert members() == before

    # a student's token may not load a roster (instructors and admins may: tests/integration/test_rosters.py)
    roster.write_text("username,email,name\ncm-new1,new1@uni.example,New One\ncm-student1,,\n")
    rc, out, err = add_students(env, env.token("cm-student1"), roster, capsys)
    assert rc == 3, out + err
    assert "Nothing was changed" in err
    assert wb.token_api(admin, "GET", "/users/cm-new1").status_code == 404

    roster.write_text("username,email,name\ncm-new1,new1@uni.example,New One\nCM-New2,,New Two\ncm-student1,,\n")
    rc, out, err = add_students(env, admin, roster, capsys)
    assert rc == 0, out + err
    assert "created 2 hub user(s): cm-new1, cm-new2" in out
    assert f"added 2 student(s) to {COURSE}: cm-new1, cm-new2 (1 already members)" in out
    assert {"cm-new1", "cm-new2", "cm-student1"} <= set(members())
    rc, out, err = add_students(env, admin, roster, capsys)  # again: nothing to do
    assert rc == 0 and "nothing to do" in out


def test_course_link_opens_for_a_logged_in_student(env, capsys):
    wb = env.wb
    assert main(["course", "link", COURSE, "exercise.md", "--hub-url", wb.url, "--config", str(env.config)]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith(f"{wb.url}/hub/user-redirect/git-pull?")

    token = env.token("cm-student1")
    if not wb.token_api(token, "GET", "/users/cm-student1").json().get("servers"):
        wb.start_server(token, "cm-student1")
    browser = wb.login("cm-student1")
    r = browser.get(link, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert urlsplit(r.url).path == "/user/cm-student1/git-pull"
    assert r.history[0].status_code == 302
    assert "git-pull" in r.text  # nbgitpuller's page, which then calls its API and opens urlpath

    # what that page's script does next: the pull, into the same folder, keeping the student's answer
    query = {k: v[0] for k, v in parse_qs(urlsplit(r.url).query).items()}
    assert query["urlpath"] == f"lab/tree/{COURSE}/exercise.md" and query["targetpath"] == COURSE
    events = browser.get(
        f"{wb.url}/user/cm-student1/git-pull/api",
        params={k: query[k] for k in ("repo", "branch", "targetpath")},
        timeout=120,
    )
    phases = [
        json.loads(line[len("data: ") :]).get("phase") for line in events.text.splitlines() if line.startswith("data: ")
    ]
    assert phases[-1] == "finished", events.text[-2000:]
    assert "answer: 42" in (env.home("cm-student1") / COURSE / "exercise.md").read_text()
    # and the file the link opens is there
    r = browser.get(f"{wb.url}/user/cm-student1/{query['urlpath']}", timeout=60)
    assert r.status_code == 200
    wb.stop_server(token, "cm-student1")
