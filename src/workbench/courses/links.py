"""Course links: nbgitpuller links that pull a course's material and open a file of it."""

from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit

from workbench.policy import Material, Policy

DEFAULT_HUB_URL = "http://127.0.0.1:8000"


def hub_base(url: str) -> str:
    """The hub's public base URL from what a user may paste (``.../``, ``.../hub``, ``.../hub/api``) (pure)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--hub-url must be the hub's address like https://workbench.example.edu, got {url!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/hub/api", "/hub"):
        path = path.removesuffix(suffix)
    return f"{parts.scheme}://{parts.netloc}{path}"


class CourseError(ValueError):
    """A course command that cannot be done; the message says why and what to do."""


def course_material(policy: Policy, course: str) -> Material:
    """The course's git material, or :class:`CourseError` naming the problem (pure)."""
    group = policy.groups.get(course)
    courses = [n for n, g in policy.groups.items() if g.kind == "course"]
    if group is None or group.kind != "course":
        what = "is not a group of the policy" if group is None else f"is a {group.kind} group, not a course"
        raise CourseError(f"{course!r} {what}; courses: {', '.join(courses) or '(none)'}")
    if group.material is None:
        raise CourseError(
            f"course {course!r} has no material; add it to the policy, e.g. "
            f"groups.{course}.material: {{git: https://git.example.edu/{course}.git, branch: main}}"
        )
    return group.material


def course_link(policy: Policy, course: str, path: str, hub_url: str = DEFAULT_HUB_URL) -> str:
    """An nbgitpuller link that pulls the course's material into ``~/<course>`` and opens ``path`` in it (pure).

    ``/hub/user-redirect/`` sends each student to their own server (started if needed), whose
    nbgitpuller extension merges the material into the same folder as the pull at start
    (``targetpath``) and then opens ``lab/tree/<course>/<path>``.
    """
    material = course_material(policy, course)
    rel = path.strip().lstrip("/")
    if not rel or any(part in ("..", ".") for part in rel.split("/")):
        raise CourseError(
            f"PATH must be a file or folder of the material relative to its top, like week1/intro.ipynb, got {path!r}"
        )
    query = urlencode(
        {
            "repo": material.git,
            "branch": material.branch,
            "targetpath": course,
            "urlpath": f"lab/tree/{quote(course)}/{quote(rel)}",
        }
    )
    return f"{hub_base(hub_url)}/hub/user-redirect/git-pull?{query}"
