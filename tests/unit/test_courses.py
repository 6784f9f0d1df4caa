"""Courses: roster validation line by line, nbgitpuller links, the pull script, the course pod parts."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest

from workbench.cli.course import roster_answer, roster_url
from workbench.cli.main import main
from workbench.courses.links import course_link, hub_base
from workbench.courses.material import NOTE_NAME, courses_of, materials_path, pull_material, pull_script
from workbench.courses.roster import Student, parse_roster, parse_roster_rows, username_problem
from workbench.policy import Material, load_policy, parse_policy
from workbench.spawn.kube import (
    course_volumes,
    material_init_container,
    profile_list_for,
    render_pod,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "hub_config" / "demo.yaml"
CENTRE = ROOT / "hub_config" / "examples" / "centre.yaml"


@pytest.fixture(scope="module")
def centre():
    return load_policy(CENTRE)


# ---------------------------------------------------------------------------
# Rosters
# ---------------------------------------------------------------------------


def test_good_roster_lowercases_and_keeps_optional_columns():
    students, problems = parse_roster(
        "Username,Email,Name,student id\n"
        "alice,alice@uni.example,Alice Liddell,123\n"
        "\n"
        'Bob.Smith,,"Smith, Bob",456\n'
        "carol@uni.example\n"
    )
    assert problems == []
    assert students == [
        Student(2, "alice", "alice@uni.example", "Alice Liddell"),
        Student(4, "bob.smith", "", "Smith, Bob"),
        Student(5, "carol@uni.example", "", ""),
    ]


def test_every_bad_row_is_reported_with_its_line():
    text = (
        "username,email,name\n"
        "alice,alice@uni.example,Alice\n"
        ",x@uni.example,No Name\n"
        "Bob Smith,bob@uni.example,Bob Smith\n"
        "carol,not-an-email,Carol\n"
        "ALICE,,Alice again\n"
        "a/b,,\n"
        "..,,\n"
        "dave,dave@uni.example,Dave,extra\n"
    )
    students, problems = parse_roster(text)
    assert problems == [
        "line 3: username is empty",
        (
            "line 4: username 'Bob Smith' has a space; use the login name (e.g. 'bob.smith') and put the full name "
            "in the 'name' column"
        ),
        "line 5: email 'not-an-email' of 'carol' is not an email address",
        "line 6: username 'alice' is already on line 2",
        "line 7: username 'a/b' is not a valid JupyterHub user name (no '/', not only dots)",
        "line 8: username '..' is not a valid JupyterHub user name (no '/', not only dots)",
        "line 9: 4 fields but the header has 3 (a comma inside a name needs quotes)",
    ]
    assert [s.username for s in students] == ["alice"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "the file is empty; it needs a header line with a 'username' column, then one student a line"),
        (
            "email,name\na@b.example,A\n",
            (
                "line 1: no 'username' column in the header (email, name); the first line "
                "must name the columns, e.g. username,email,name"
            ),
        ),
        ("username\n", "no students: the file has a header but no rows"),
    ],
)
def test_roster_without_students(text, problem):
    assert parse_roster(text) == ([], [problem])


def test_username_rules():
    assert username_problem("jane.doe@uni.example") is None
    assert username_problem("Jane") is None  # JupyterHub lowercases
    assert "has a space" in username_problem(" jane")
    assert "has a space" in username_problem("jane\tdoe")
    assert "control character" in username_problem("jane\x00")


def test_json_rows_are_checked_like_csv_lines():
    students, problems = parse_roster_rows(
        {
            "students": [
                "Alice",
                {"username": "bob", "email": "bob@uni.example", "name": "Bob"},
                {"username": "Bob Smith"},
                {"username": "alice"},
                {"username": "c", "age": "3"},
                7,
            ]
        }
    )
    assert students == [Student(1, "alice"), Student(2, "bob", "bob@uni.example", "Bob")]
    assert problems[0].startswith("row 3: username 'Bob Smith' has a space")
    assert problems[1:3] == [
        "row 4: username 'alice' is already on row 1",
        "row 5: unknown field(s) age; a row has username, email and name",
    ]
    assert problems[3].startswith("row 6: expected a user name or an object")
    assert parse_roster_rows([]) == ([], ["no students: the list is empty"])
    assert parse_roster_rows({"x": 1})[1][0].startswith("the JSON body must be a list of students")


def test_roster_url():
    assert roster_url("https://wb.example.edu/hub/", "course-ml101") == (
        "https://wb.example.edu/services/rosters/api/courses/course-ml101/students"
    )
    assert roster_url("http://127.0.0.1:8000", "c", "a/b") == (
        "http://127.0.0.1:8000/services/rosters/api/courses/c/students/a%2Fb"
    )


def answer(status, doc=None, text=""):
    def json():
        if doc is None:
            raise ValueError("no JSON")
        return doc

    return SimpleNamespace(status_code=status, json=json, text=text, reason="Reason")


def test_roster_answers_become_exit_codes_and_lines():
    ok = answer(200, {"report": ["created 1 hub user(s): alice", "added 1 student(s) to c: alice"]})
    assert roster_answer(ok, "r.csv", "http://hub") == (
        0,
        ["created 1 hub user(s): alice", "added 1 student(s) to c: alice"],
        [],
    )
    refused = answer(
        400,
        {
            "status": 400,
            "message": "1 problem(s)",
            "problems": ["line 3: 'researcher' is a member of physics-lab, which is not a course"],
        },
    )
    assert roster_answer(refused, "r.csv", "http://hub") == (
        2,
        [],
        [
            "r.csv: 1 problem(s); nothing was changed:",
            "  line 3: 'researcher' is a member of physics-lab, which is not a course",
        ],
    )
    rc, out, err = roster_answer(answer(403, {"message": "bob may not load the roster of c"}), "r.csv", "http://hub")
    assert (rc, out, err) == (3, [], ["bob may not load the roster of c (403). Nothing was changed."])
    rc, _, err = roster_answer(answer(404, None, "<html>404</html>"), "r.csv", "http://hub")
    assert rc == 3 and "the hub at http://hub has no roster service (/services/rosters/)" in err[0]


def token_file(tmp_path, token: str = "tok", mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return str(path)


def test_cli_add_students_posts_the_csv_to_the_roster_service(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_request(method, url, headers, params, data, timeout):
        calls.append((method, url, headers, params, data))
        return answer(200, {"report": ["added 1 student(s) to course-ml101: alice"]})

    monkeypatch.setattr("requests.request", fake_request)
    roster = tmp_path / "roster.csv"
    roster.write_text("username\nalice\n")
    rc = main(
        [
            "course",
            "add-students",
            "course-ml101",
            str(roster),
            "--config",
            str(DEMO),
            "--hub-url",
            "http://hub.example:8000/hub",
            "--token-file",
            token_file(tmp_path),
            "--add-only",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out == "added 1 student(s) to course-ml101: alice\n"
    method, url, headers, params, data = calls[0]
    assert (method, url) == ("POST", "http://hub.example:8000/services/rosters/api/courses/course-ml101/students")
    assert headers == {"Authorization": "token tok", "Content-Type": "text/csv; charset=utf-8"}
    assert params == {"mode": "add"} and data == b"username\nalice\n"


def test_cli_remove_student_and_an_unreachable_hub(capsys, monkeypatch):
    import requests

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")

    def down(*a, **kw):
        raise requests.ConnectionError("refused")

    monkeypatch.setattr("requests.request", down)
    rc = main(
        [
            "course",
            "remove-student",
            "course-ml101",
            "Alice",
            "--config",
            str(DEMO),
            "--hub-url",
            "http://127.0.0.1:1",
        ]
    )
    assert rc == 3
    assert "cannot reach the hub at http://127.0.0.1:1" in capsys.readouterr().err


def test_cli_add_students_reports_bad_rows_and_contacts_no_hub(tmp_path, capsys):
    tok = token_file(tmp_path)
    roster = tmp_path / "roster.csv"
    roster.write_text("username,email\nalice,alice@uni.example\nbob,\nBob Smith,\n")
    # the hub URL points nowhere: validation fails before any request
    rc = main(
        [
            "course",
            "add-students",
            "course-ml101",
            str(roster),
            "--config",
            str(DEMO),
            "--hub-url",
            "http://127.0.0.1:1",
            "--token-file",
            tok,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{roster}: 1 problem(s); nothing was changed:" in err
    assert "line 4: username 'Bob Smith' has a space" in err


@pytest.mark.parametrize(
    "course, args, message",
    [
        ("physics-lab", ["--token-file", "{private}"], "'physics-lab' is not a course of"),
        ("nope", ["--token-file", "{private}"], "'nope' is not a course of"),
        ("course-ml101", [], "no hub token; set $JUPYTERHUB_API_TOKEN or pass --token-file PATH"),
        ("course-ml101", ["--token", "t"], "--token is no longer accepted (a token on the command line is visible"),
        (
            "course-ml101",
            ["--token-file", "{public}"],
            "can be read by other users (mode 0644); a token must be private",
        ),
        ("course-ml101", ["--token-file", "{group}"], "can be read by other users (mode 0640)"),
        ("course-ml101", ["--token-file", "{empty}"], "is empty; write the hub API token into it"),
        ("course-ml101", ["--token-file", "{missing}"], "cannot read"),
    ],
)
def test_cli_add_students_refusals(tmp_path, capsys, monkeypatch, course, args, message):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    roster = tmp_path / "r.csv"
    roster.write_text("username\nalice\n")
    files = {"private": token_file(tmp_path)}
    for name, mode, text in (("public", 0o644, "t"), ("group", 0o640, "t"), ("empty", 0o600, "")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(mode)
        files[name] = str(tmp_path / name)
    files["missing"] = str(tmp_path / "missing")
    args = [a.format(**files) for a in args]
    assert main(["course", "add-students", course, str(roster), "--config", str(DEMO), *args]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------


def test_course_link(centre):
    link = course_link(centre, "course-ml101", "week1/intro 1.ipynb", "https://wb.example.edu/hub/")
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://wb.example.edu/hub/user-redirect/git-pull"
    assert parse_qs(parts.query) == {
        "repo": ["https://git.example.edu/teaching/ml101-material.git"],
        "branch": ["2024-autumn"],
        "targetpath": ["course-ml101"],
        "urlpath": ["lab/tree/course-ml101/week1/intro%201.ipynb"],
    }


@pytest.mark.parametrize(
    "url, base",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://wb.example.edu/", "https://wb.example.edu"),
        ("https://wb.example.edu/hub", "https://wb.example.edu"),
        ("https://wb.example.edu/prefix/hub/api/", "https://wb.example.edu/prefix"),
        ("http://hub", "http://hub"),
        ("http://hub:8081/hub/api", "http://hub:8081"),
    ],
)
def test_hub_base(url, base):
    assert hub_base(url) == base


@pytest.mark.parametrize(
    "course, path, message",
    [
        ("physics-lab", "x", "'physics-lab' is a research group, not a course; courses: course-ml101"),
        ("nope", "x", "'nope' is not a group of the policy; courses: course-ml101"),
        (
            "course-ml101",
            "x",
            (
                "course 'course-ml101' has no material; add it to the policy, e.g. "
                "groups.course-ml101.material: {git: https://git.example.edu/course-ml101.git, branch: main}"
            ),
        ),
    ],
)
def test_cli_course_link_errors(capsys, course, path, message):
    assert main(["course", "link", course, path, "--config", str(DEMO)]) == 2
    assert capsys.readouterr().err == f"workbench course link: {message}\n"


def test_cli_course_link_rejects_paths_outside_the_material(capsys):
    assert main(["course", "link", "course-ml101", "../secrets", "--config", str(CENTRE)]) == 2
    assert "PATH must be a file or folder of the material" in capsys.readouterr().err


def test_cli_course_link_prints_the_link(capsys):
    assert main(["course", "link", "course-geo210", "/lab1.ipynb", "--config", str(CENTRE)]) == 0
    assert capsys.readouterr().out == (
        "http://127.0.0.1:8000/hub/user-redirect/git-pull?repo=https%3A%2F%2Fgit.example.edu%2Fteaching%2Fgeo210.git"
        "&branch=main&targetpath=course-geo210&urlpath=lab%2Ftree%2Fcourse-geo210%2Flab1.ipynb\n"
    )


# ---------------------------------------------------------------------------
# Which courses, folders
# ---------------------------------------------------------------------------


def test_courses_of_members_and_instructors(centre):
    assert courses_of(centre, ["climate-lab", "course-geo210"]) == ["course-geo210"]
    assert courses_of(centre, ["climate-lab"], "lmartin") == ["course-geo210"]  # teaches it without being a member
    assert courses_of(centre, ["climate-lab"], "ada") == []
    assert materials_path(centre, "course-ml101") == "/srv/workbench/courses/course-ml101"


def test_materials_path_needs_the_course_placeholder():
    policy = parse_policy({"auth": {"type": "demo", "demo_users": {"u": {}}}, "storage": {"courses": "/srv/courses"}})
    with pytest.raises(ValueError, match=r"storage.courses must be an absolute path containing \{course\}"):
        materials_path(policy, "c")


# ---------------------------------------------------------------------------
# The pull script, run for real against a local git repository
# ---------------------------------------------------------------------------


def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.example", *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.fixture
def upstream(tmp_path):
    bare = tmp_path / "material.git"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=tmp_path)
    work = tmp_path / "upstream"
    git("clone", "-q", str(bare), str(work), cwd=tmp_path)
    (work / "exercise.md").write_text("# Exercise 1\nanswer: ...\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "week 1", cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    return SimpleNamespace(url=f"file://{bare}", work=work)


def run_pull(pulls, home) -> int:
    log = logging.getLogger("test-courses")
    return asyncio.run(pull_material(pulls, str(home), None, log))


def test_pull_clones_then_merges_keeping_the_students_edits(tmp_path, upstream):
    home = tmp_path / "home"
    home.mkdir()
    pulls = [("course-x", Material(git=upstream.url, branch="main"))]
    assert run_pull(pulls, home) == 0
    exercise = home / "course-x" / "exercise.md"
    assert exercise.read_text() == "# Exercise 1\nanswer: ...\n"

    exercise.write_text("# Exercise 1\nanswer: 42\n")  # the student's work
    (upstream.work / "week2.md").write_text("# Week 2\n")
    git("add", ".", cwd=upstream.work)
    git("commit", "-qm", "week 2", cwd=upstream.work)
    git("push", "-q", "origin", "HEAD:main", cwd=upstream.work)

    assert run_pull(pulls, home) == 0
    assert exercise.read_text() == "# Exercise 1\nanswer: 42\n"
    assert (home / "course-x" / "week2.md").read_text() == "# Week 2\n"
    assert not (home / "course-x" / NOTE_NAME).exists()


def test_a_failed_pull_leaves_a_note_and_the_next_good_one_removes_it(tmp_path, upstream, caplog):
    home = tmp_path / "home"
    home.mkdir()
    broken = [("course-x", Material(git=f"file://{tmp_path}/nope.git", branch="main"))]
    with caplog.at_level(logging.WARNING, logger="test-courses"):
        assert run_pull(broken, home) == 1
    note = home / "course-x" / NOTE_NAME
    text = note.read_text()
    assert text.startswith("The course material of course-x could not be updated when your server started")
    assert f"Material: file://{tmp_path}/nope.git (branch main)" in text
    assert f"\ngit cannot read file://{tmp_path}/nope.git: fatal: " in text  # git's own words
    assert "1 course(s) not updated (the server starts anyway)" in caplog.text

    good = [("course-x", Material(git=upstream.url, branch="main"))]
    assert run_pull(good, home) == 0  # the folder held only the note: cloned afresh
    assert (home / "course-x" / "exercise.md").exists()
    assert not note.exists()


def test_a_students_own_folder_of_that_name_is_never_touched(tmp_path, upstream):
    home = tmp_path / "home"
    (home / "course-x").mkdir(parents=True)
    (home / "course-x" / "mine.txt").write_text("mine")
    pulls = [
        ("course-x", Material(git=upstream.url, branch="main")),
        ("course-y", Material(git=upstream.url, branch="main")),
    ]
    assert run_pull(pulls, home) == 1  # course-y still pulled
    assert (home / "course-x" / "mine.txt").read_text() == "mine"
    assert "exists but is not a copy of the course material" in (home / "course-x" / NOTE_NAME).read_text()
    assert (home / "course-y" / "exercise.md").exists()


def test_pull_script_quotes_everything():
    script = pull_script(
        [("c", Material(git="https://x.example/a b.git", branch="it's"))], "/home/j o", report_failures=False
    )
    assert "pull c 'https://x.example/a b.git' 'it'\"'\"'s' '/home/j o/c'" in script
    assert script.endswith("exit 0\n")


# ---------------------------------------------------------------------------
# Kubernetes: the course parts of the pod
# ---------------------------------------------------------------------------


def test_course_volumes_read_only_for_students_writable_for_instructors(centre):
    volumes, mounts = course_volumes(centre, ["course-geo210", "course-ml101", "climate-lab"], "lmartin")
    assert volumes == {
        "materials-course-ml101": {
            "name": "materials-course-ml101",
            "persistentVolumeClaim": {"claimName": "workbench-course-course-ml101", "readOnly": True},
        },
        "materials-course-geo210": {
            "name": "materials-course-geo210",
            "persistentVolumeClaim": {"claimName": "workbench-course-course-geo210"},
        },
    }
    assert mounts == {
        "materials-course-ml101": {
            "name": "materials-course-ml101",
            "mountPath": "/srv/workbench/courses/course-ml101",
            "readOnly": True,
        },
        "materials-course-geo210": {
            "name": "materials-course-geo210",
            "mountPath": "/srv/workbench/courses/course-geo210",
        },
    }
    assert course_volumes(centre, ["climate-lab"], "ada") == ({}, {})


def test_material_init_container(centre):
    init = material_init_container(centre, ["course-ml101"], "mig-1g", "ada")
    command = init.pop("command")
    assert init == {
        "name": "course-material",
        "image": centre.images[centre.profiles["mig-1g"].image].image,
        "env": [
            {"name": "HOME", "value": "/home/jovyan"},
            {"name": "LANG", "value": "C.UTF-8"},
            {"name": "GIT_TERMINAL_PROMPT", "value": "0"},
        ],
        "workingDir": "/home/jovyan",
        "volumeMounts": [{"name": "home", "mountPath": "/home/jovyan"}],
        "securityContext": {
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": centre.profiles["mig-1g"].cpu, "memory": centre.profiles["mig-1g"].memory},
            "limits": {
                "cpu": centre.profiles["mig-1g"].cpu,
                "memory": centre.profiles["mig-1g"].memory_limit or centre.profiles["mig-1g"].memory,
            },
        },
    }
    assert command[:2] == ["sh", "-c"]
    # KubeSpawner formats init containers: braces doubled here come out single in the pod
    assert command[2].replace("{{", "{").replace("}}", "}") == pull_script(
        [("course-ml101", centre.groups["course-ml101"].material)], "/home/jovyan", report_failures=False
    )
    assert material_init_container(centre, ["climate-lab"], "cpu-small", "ada") is None


def test_profile_list_carries_the_course_parts_for_every_profile(centre):
    for entry in profile_list_for(centre, ["course-ml101"], "ada"):
        override = entry["kubespawner_override"]
        assert override["init_containers"]["course-material"]["image"] == override["image"]
        assert "materials-course-ml101" in override["volumes"]
        assert override["volume_mounts"]["materials-course-ml101"]["readOnly"] is True


def test_rendered_pod_pulls_the_material_before_the_notebook_and_mounts_the_folders(centre):
    pod = render_pod(centre, "lmartin", ["course-geo210", "course-ml101"], "cpu-small")
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    [init] = pod["spec"]["initContainers"]
    assert init["name"] == "course-material"
    assert init["image"] == pod["spec"]["containers"][0]["image"]
    script = init["command"][2]
    assert ': "${GITPULLER:=gitpuller}"' in script  # the braces survived KubeSpawner's formatting
    assert (
        "pull course-ml101 https://git.example.edu/teaching/ml101-material.git 2024-autumn "
        "/home/jovyan/course-ml101" in script
    )
    assert "pull course-geo210 https://git.example.edu/teaching/geo210.git main /home/jovyan/course-geo210" in script
    assert script.endswith("exit 0\n")
    assert init["volumeMounts"] == [{"name": "home", "mountPath": "/home/jovyan"}]
    assert init["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/srv/workbench/courses/course-geo210"].get("readOnly") is None  # lmartin teaches it
    assert mounts["/srv/workbench/courses/course-ml101"]["readOnly"] is True


def test_rendered_pod_of_a_research_user_has_no_course_parts(centre):
    pod = render_pod(centre, "ada", ["climate-lab"], None)
    assert "initContainers" not in pod["spec"]
    assert not [m for m in pod["spec"]["containers"][0]["volumeMounts"] if "/courses/" in m["mountPath"]]


def test_roster_names_without_a_unix_account_are_refused():
    students, problems = parse_roster("username\nok1\nbad:name\nback\\slash\n")
    assert [s.username for s in students] == ["ok1"]
    assert problems == [
        "line 3: the user name 'bad:name' contains a colon (':'): no account can be made for it; "
        "use the student's login name",
        "line 4: the user name 'back\\\\slash' contains a backslash ('\\\\'): no account can be made for it; "
        "use the student's login name",
    ]


def test_unix_groups_of_a_user_follow_the_policy():
    import yaml

    from workbench.courses.material import unix_groups_of
    from workbench.policy import parse_policy

    policy = parse_policy(yaml.safe_load(DEMO.read_text()))
    assert unix_groups_of(policy, ["physics-lab", "course-ml101"], "researcher") == [
        "wb-g-physics-lab",
        "wb-g-course-ml101",
    ]
    assert unix_groups_of(policy, ["course-ml101"], "instructor") == ["wb-g-course-ml101", "wb-i-course-ml101"]
    assert unix_groups_of(policy, ["not-a-policy-group"], "x") == []
