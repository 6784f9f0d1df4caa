"""Groups at login: the identity provider's (or the demo's) groups plus the courses whose roster lists the user.

Pure helpers, one read of the hub's own database, and :class:`RosterLoginMixin`, the part every Workbench
authenticator shares (the ``course_groups`` setting, the roster merge, the user-name rule); no service code (see
:mod:`workbench.services.rosters`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from traitlets import List, Unicode
from traitlets.config import LoggingConfigurable

from workbench.names import ROSTER_PROPERTY
from workbench.sysusers import hub_username_problem

log = logging.getLogger(__name__)


def roster_of(group: Mapping | None) -> list[str]:
    """The roster kept in a hub group model's (or ORM group's) properties (pure)."""
    props = (group or {}).get("properties") or {}
    names = props.get(ROSTER_PROPERTY) if isinstance(props, Mapping) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def rostered_courses(groups: Iterable[tuple[str, Mapping | None]], username: str) -> list[str]:
    """Names of the groups (``(name, properties)``) whose roster lists ``username`` (pure)."""
    return [name for name, props in groups if username in roster_of({"properties": props})]


def with_roster_groups(
    groups: Iterable[str],
    rostered: Iterable[str],
    allowed: Iterable[str] | None = None,
    courses: Iterable[str] | None = None,
) -> list[str]:
    """The groups from the identity provider / policy plus the rostered ones (in ``allowed``, if given) (pure).

    With ``courses`` (the policy's course groups), a user whom the provider or the policy puts in any group that is
    not a course (research, startup, admin) gets no rostered course: a roster is an instructor's word, and must
    never give an instructor's ``access:servers!group=<course>`` a researcher's or an admin's server.
    """
    groups = list(groups)
    keep = None if allowed is None else set(allowed)
    if courses is not None:
        course_set = set(courses)
        if any(g not in course_set for g in groups):
            return list(dict.fromkeys(groups))
    return list(dict.fromkeys([*groups, *(g for g in rostered if keep is None or g in keep)]))


def merge_roster_groups(
    db,
    username: str,
    groups: Iterable[str],
    allowed: Iterable[str] | None = None,
    courses: Iterable[str] | None = None,
) -> list[str]:
    """``groups`` plus the groups whose roster lists ``username``, read from the hub's ORM session ``db``.

    Called by the authenticators after they computed a user's groups at login (``manage_groups``
    would otherwise take a rostered student out of the course). A failure to read the rosters is
    logged and leaves ``groups`` as they are: it must not stop anyone from logging in.
    """
    groups = list(groups)
    if db is None:
        return groups
    try:
        from jupyterhub import orm

        found = [(g.name, g.properties) for g in db.query(orm.Group).all()]
    except Exception:  # logged; the login goes on with the provider's groups
        log.exception("could not read the course rosters for %s", username)
        return groups
    rostered = rostered_courses(found, username)
    merged = with_roster_groups(groups, rostered, allowed, courses)
    if rostered and not set(rostered) <= set(merged):
        log.warning(
            "%s is on the roster of %s but in the non-course group(s) %s: the roster is ignored",
            username,
            ", ".join(rostered),
            ", ".join(g for g in groups if courses is not None and g not in set(courses)),
        )
    return merged


class RosterLoginMixin(LoggingConfigurable):
    """What the demo and the OAuth authenticators share: put it before JupyterHub's ``Authenticator`` in the bases.

    - ``course_groups``: the policy's course groups (see :func:`with_roster_groups`);
    - :meth:`groups_with_rosters`: a user's groups at login plus their rostered courses;
    - :meth:`validate_username`: JupyterHub's rules plus :func:`workbench.sysusers.hub_username_problem`, for users
      made through the API too.
    """

    course_groups = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        help="""The policy's course groups: a roster adds courses only to users in no other group
        (None: rosters are merged unconditionally).""",
    ).tag(config=True)

    def groups_with_rosters(self, db, username: str, groups: Iterable[str], allowed: Iterable[str] | None = None):
        """``groups`` plus the courses whose roster lists ``username`` (:func:`merge_roster_groups`)."""
        return merge_roster_groups(db, username, groups, allowed, self.course_groups)

    def validate_username(self, username):
        problem = hub_username_problem(username)
        if problem:
            self.log.warning("Refusing the user name %r: %s", username, problem)
        return problem is None and super().validate_username(username)
