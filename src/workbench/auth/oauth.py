"""Login -> groups with OAuthenticator, driven by the platform policy.

``auth_settings(policy, runtime)`` returns the authenticator's traitlets sections
(``{section: {trait: value}}``) for the policy's ``auth.type``:

- ``demo``: :class:`workbench.auth.demo.DemoAuthenticator` with the policy's demo accounts;
- ``generic-oauth``: :class:`WorkbenchGenericOAuthenticator`, any OAuth2 / OpenID Connect provider
  (a university's SSO), whose ``groups_claim`` lists the user's groups;
- ``github``: :class:`WorkbenchGitHubOAuthenticator`, GitHub organisations and teams mapped to
  policy groups by ``auth.github_teams`` (startups).

The contract of both OAuth authenticators (:class:`PolicyGroupsAuthenticator`):

- a user's hub groups are exactly the *policy* groups their identity provider vouches for (other
  groups the provider sends are ignored, so the hub never fills up with a university's thousands
  of mailing lists), plus the courses whose roster lists them (:mod:`workbench.services.rosters.app`, for
  providers that send no course groups), synchronised at every login (``manage_groups``);
- a user with no policy group cannot log in: they get a 403 page that says so and shows what the
  provider sent, never a 500; that includes a missing groups claim, an empty one and a malformed
  one (a string instead of a list, a list with something other than names, an object);
- members of ``auth.admin_groups`` are hub admins (and lose admin when they leave the group);
- the client secret is read from the environment variable named by ``auth.client_secret_env``;
  it never appears in the policy, in these settings or in logs;
- generic-oauth with ``auth.jwks_url``: the provider's ID token must be there and is verified before
  anything else (signature with the provider's published keys, ``iss`` = ``auth.issuer``, ``aud`` = the
  client ID, expiry): OAuthenticator 17 never checks an ID token's signature or issuer (it only decodes
  one, unverified but for audience and expiry, with ``userdata_from_id_token``). A refused token is a
  403 page naming the reason.

oauthenticator is imported when available; without it this module still imports (the demo mode
does not need it) and ``auth_settings`` says what to install for an OAuth auth type.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from inspect import isawaitable
from typing import Any

from jupyterhub.auth import Authenticator
from tornado import web
from traitlets import Dict, List, Unicode, default

try:  # PyJWT, a dependency of oauthenticator
    import jwt
except ImportError:  # pragma: no cover - only without oauthenticator
    jwt = None  # type: ignore[assignment]

from workbench.auth.demo import DemoAuthenticator
from workbench.auth.groups import RosterLoginMixin
from workbench.policy import Policy, PolicyError
from workbench.runtime import Runtime
from workbench.sysusers import hub_username_problem

try:
    from oauthenticator.generic import GenericOAuthenticator
    from oauthenticator.github import GitHubOAuthenticator
    from oauthenticator.oauth2 import OAuthCallbackHandler

    OAUTHENTICATOR_MISSING = ""
except ImportError as _err:  # pragma: no cover - exercised only on installs without oauthenticator
    OAUTHENTICATOR_MISSING = str(_err)

    class GenericOAuthenticator(Authenticator):  # type: ignore[no-redef]
        """Stand-in so that this module imports without oauthenticator; never usable."""

        def __init__(self, **kwargs):
            raise RuntimeError(
                f"oauthenticator is not installed ({OAUTHENTICATOR_MISSING}); pip install 'oauthenticator>=17,<18'"
            )

    GitHubOAuthenticator = GenericOAuthenticator  # type: ignore[misc,assignment]
    OAuthCallbackHandler = object  # type: ignore[misc,assignment]


__all__ = [
    "DEFAULT_LOGIN_SERVICE",
    "DEFAULT_SCOPES",
    "NOT_ENTITLED",
    "PolicyGroupsAuthenticator",
    "WorkbenchGenericOAuthenticator",
    "WorkbenchGitHubOAuthenticator",
    "auth_settings",
    "lookup_claim",
    "parse_groups_claim",
    "refusal_message",
]

#: scopes requested when the policy's ``auth.scope`` is not set
DEFAULT_SCOPES: dict[str, list[str]] = {
    "generic-oauth": ["openid", "profile", "email"],
    "github": ["read:org"],  # to see private organisation and team membership
}
#: login button text ("Sign in with ...") when ``auth.login_service`` is not set
DEFAULT_LOGIN_SERVICE = {"generic-oauth": "single sign-on", "github": "GitHub"}

#: the first words of the 403 page of a user with no policy group
NOT_ENTITLED = "You are not in any group entitled to use this workbench"
_ASK = "If you think you should have access, ask the platform team to add you to one of the workbench's groups."
#: auth_state key where the GitHub authenticator keeps the organisations / teams the user is in
GITHUB_MEMBERSHIPS_KEY = "workbench_github_memberships"
_SHOW_AT_MOST = 20  # groups listed on the 403 page


def _cls(klass: type) -> str:
    return f"{klass.__module__}.{klass.__name__}"


# ---------------------------------------------------------------------------
# Reading the groups claim (pure)
# ---------------------------------------------------------------------------


def lookup_claim(data: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` of the claim at ``path`` in ``data`` (pure).

    ``path`` is a key, or a dotted path into nested objects (``realm_access.roles``). A key that
    itself contains dots (Auth0's ``https://example.org/groups``) is found too: at each level the
    longest matching key wins.
    """
    if not isinstance(data, Mapping):
        return False, None
    if path in data:
        return True, data[path]
    # try "a.b.c" as data["a.b"]["c"], data["a"]["b.c"], data["a"]["b"]["c"], longest first
    dots = [i for i, ch in enumerate(path) if ch == "."]
    for i in reversed(dots):
        head, rest = path[:i], path[i + 1 :]
        if head in data:
            found, value = lookup_claim(data[head], rest)
            if found:
                return True, value
    return False, None


def parse_groups_claim(value: Any) -> list[str] | None:
    """The group names in a groups claim, or None when it is not a list of names (pure)."""
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        return None
    return list(dict.fromkeys(value))  # unique, in the provider's order


def _short(value: Any, limit: int = 120) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_KINDS = {str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _describe_malformed(value: Any) -> str:
    if isinstance(value, list):
        bad = next(g for g in value if not isinstance(g, str))
        return f"a list containing {_short(bad, 60)} ({_kind(bad)})"
    if value is None:
        return "null"
    return f"{_kind(value)}: {_short(value)}"


def refusal_message(claim: str, found: bool, value: Any) -> str:
    """The 403 message for a user whose ``claim`` (found or not, with ``value``) gives no policy group (pure)."""
    if not found:
        sent = f"your identity provider sent no {claim!r} claim"
    else:
        groups = parse_groups_claim(value)
        if groups is None:
            sent = (
                f"your identity provider sent a malformed {claim!r} claim "
                f"(expected a list of group names, got {_describe_malformed(value)})"
            )
        elif not groups:
            sent = "your identity provider sent groups: none (an empty list)"
        else:
            shown = ", ".join(_short(g, 80) for g in groups[:_SHOW_AT_MOST])
            more = f" and {len(groups) - _SHOW_AT_MOST} more" if len(groups) > _SHOW_AT_MOST else ""
            sent = f"your identity provider sent groups: {shown}{more}"
    return f"{NOT_ENTITLED}; {sent}. {_ASK}"


# ---------------------------------------------------------------------------
# Authenticators
# ---------------------------------------------------------------------------


class WorkbenchOAuthCallbackHandler(OAuthCallbackHandler):
    """The OAuth callback, logging its errors without the one-time code and state of its URL.

    Tornado's default logs ``request.uri`` with the query, i.e. the authorization code.
    """

    def log_exception(self, typ, value, tb):
        summary = f"{self.request.method} {self.request.path} ({self.request.remote_ip})"
        if isinstance(value, web.HTTPError):
            if value.get_message():
                self.log.warning("%d %s: %s", value.status_code, summary, value.get_message())
        else:
            self.log.error("Uncaught exception %s", summary, exc_info=(typ, value, tb))


class PolicyGroupsAuthenticator(RosterLoginMixin, Authenticator):
    """Mixin for OAuthenticators: policy groups decide who logs in (see the module docstring).

    Subclasses implement :meth:`get_user_groups` (returning only policy groups, i.e. names in
    ``allowed_groups``) and :meth:`refusal_message`; OAuthenticator's ``_apply_managed_groups``
    turns the groups into the auth model's ``groups`` and ``admin`` (from ``admin_groups``).
    """

    callback_handler = WorkbenchOAuthCallbackHandler

    client_secret_env = Unicode(
        help="""Name of the environment variable holding the OAuth client secret
        (``auth.client_secret_env`` of the policy). The secret is read from there at start-up and
        never written to configuration or logs.""",
    ).tag(config=True)

    @default("client_secret")
    def _client_secret_from_env(self):
        return os.environ.get(self.client_secret_env, "") if self.client_secret_env else ""

    @default("manage_groups")
    def _default_manage_groups(self):
        return True

    @default("allow_all")
    def _default_allow_all(self):
        return False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.client_secret:
            raise ValueError(
                f"{type(self).__name__}: no OAuth client secret: the environment variable "
                f"{self.client_secret_env or '(none named)'} (auth.client_secret_env) is not set or empty"
            )

    def user_info_to_username(self, user_info):
        """The user name from ``username_claim``; a clear 403 (not a 500) when the provider sent none."""
        claim = self.username_claim
        if isinstance(claim, str):
            value = user_info.get(claim) if isinstance(user_info, Mapping) else None
            if not isinstance(value, str) or not value.strip():
                self.log.warning("Login refused: the identity provider sent no usable %r claim", claim)
                raise web.HTTPError(
                    403,
                    f"Your identity provider did not send your user name (no usable {claim!r} claim), so you "
                    "cannot log in. Ask the platform team to check auth.username_claim of the platform policy.",
                )
        name = super().user_info_to_username(user_info)
        if problem := hub_username_problem(name):
            self.log.warning("Login refused: %s", problem)
            raise web.HTTPError(
                403,
                f"You cannot log in: {problem} (the {claim!r} claim of your identity provider), and the workbench "
                "cannot make an account for it. Ask the platform team to set auth.username_claim of the platform "
                "policy to a claim without such characters (e.g. preferred_username), or to fix your name at the "
                "identity provider.",
            )
        return name

    def refusal_message(self, auth_model: dict | None) -> str:
        raise NotImplementedError

    def _with_rosters(self, auth_model, db):
        """Add the course groups whose roster lists the user (:mod:`workbench.services.rosters.app`) to the provider's ones.

        Before ``check_allowed``, so a rostered student whose provider sends no course group logs in.
        """
        if isinstance(auth_model, dict) and self.manage_groups and "groups" in auth_model:
            auth_model["groups"] = self.groups_with_rosters(
                db, auth_model["name"], auth_model["groups"], self.allowed_groups
            )
        return auth_model

    async def authenticate(self, handler, data=None, **kwargs):
        auth_model = await super().authenticate(handler, data, **kwargs)
        return self._with_rosters(auth_model, getattr(handler, "db", None))

    async def refresh_user(self, user, handler=None, **kwargs):
        refreshed = await super().refresh_user(user, handler, **kwargs)
        return self._with_rosters(refreshed, getattr(user, "db", None))

    async def check_allowed(self, username, auth_model):
        """Allow exactly the users with at least one policy group; refuse the others with a clear 403.

        ``allow_all``, ``allowed_users`` and ``allow_existing_users`` play no part: deny by default.
        """
        if auth_model and auth_model.get("groups"):
            return True
        self.log.warning("Login refused for %r: no policy group", username)  # the handler logs the reason
        raise web.HTTPError(403, self.refusal_message(auth_model))


class WorkbenchGenericOAuthenticator(PolicyGroupsAuthenticator, GenericOAuthenticator):
    """GenericOAuthenticator whose groups come from a claim of the user info, robustly.

    ``auth_state_groups_key`` is ``oauth_user.<auth.groups_claim>``. Unlike OAuthenticator 17's
    own reading of it, a claim that is not a list of names is never turned into groups (a string
    ``"physics-lab"`` is not split into the one-letter groups ``p``, ``h``, ...; an object does not
    give its keys; a list mixing names and numbers does not crash with a 500), and only policy
    groups are kept.
    """

    jwks_url = Unicode(
        "",
        config=True,
        help="""The provider's JSON Web Key Set ('jwks_uri' in its /.well-known/openid-configuration).

        When set, every login needs an ID token signed by one of these keys, issued by :attr:`issuer` for
        this client (``aud``) and not expired; anything else is refused with a 403 before the user info is
        read. Empty: ID tokens are not checked (OAuthenticator's own behaviour).
        """,
    )
    issuer = Unicode("", config=True, help="The provider's issuer identifier, the ID token's required ``iss``.")

    #: signature algorithms accepted for ID tokens (never 'none', never HMAC with a public key)
    id_token_algorithms = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
    _jwks_client = None

    @default("auth_state_groups_key")
    def _default_groups_key(self):
        return f"{self.user_auth_state_key}.groups"

    def verify_id_token(self, id_token: str | None) -> dict:
        """The verified claims of ``id_token`` (blocking: fetches the key set once, then caches it).

        Raises a 403 naming what is wrong: no token, a signature by another key, another issuer, another
        audience, an expired token.
        """
        if not id_token:
            raise web.HTTPError(
                403, "Login refused: the identity provider sent no ID token (is 'openid' in auth.scope?)"
            )
        if self._jwks_client is None:
            self._jwks_client = jwt.PyJWKClient(self.jwks_url, cache_keys=True)
        try:
            key = self._jwks_client.get_signing_key_from_jwt(id_token).key
            return jwt.decode(
                id_token,
                key,
                algorithms=list(self.id_token_algorithms),
                audience=self.client_id,
                issuer=self.issuer,
                options={"require": ["iss", "aud", "exp", "sub"]},
            )
        except jwt.PyJWTError as err:
            self.log.warning("Refused an ID token from %s: %s", self.token_url, err)
            raise web.HTTPError(403, f"Login refused: the identity provider's ID token is not valid ({err})") from None

    async def token_to_user(self, token_info):
        if self.jwks_url:
            await asyncio.to_thread(self.verify_id_token, token_info.get("id_token"))
        return await super().token_to_user(token_info)

    def _groups_claim(self) -> str:
        key = self.auth_state_groups_key
        prefix = f"{self.user_auth_state_key}."
        return key[len(prefix) :] if isinstance(key, str) and key.startswith(prefix) else str(key)

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        key = self.auth_state_groups_key
        if callable(key):
            sent = key(auth_state)
            if isawaitable(sent):
                sent = await sent
            groups = parse_groups_claim(list(sent) if isinstance(sent, set | tuple) else sent) or []
        else:
            found, value = lookup_claim(auth_state, key)
            groups = (parse_groups_claim(value) if found else None) or []
        return {g for g in groups if g in self.allowed_groups}

    def refusal_message(self, auth_model: dict | None) -> str:
        auth_state = (auth_model or {}).get("auth_state") or {}
        key = self.auth_state_groups_key
        found, value = lookup_claim(auth_state, key) if isinstance(key, str) else (False, None)
        return refusal_message(self._groups_claim(), found, value)


class WorkbenchGitHubOAuthenticator(PolicyGroupsAuthenticator, GitHubOAuthenticator):
    """GitHubOAuthenticator whose groups come from GitHub organisation / team membership.

    ``github_teams`` maps each policy group to organisations (``acme-inc``) and teams
    (``acme-inc:ml-team``); at login the membership of the user in each of them is asked of the
    GitHub API (the ``read:org`` scope shows private membership too), and the user's groups are
    the policy groups with at least one membership.
    """

    github_teams = Dict(
        value_trait=List(Unicode()),
        help="""Policy group -> GitHub organisations (``org``) and teams (``org:team-slug``) whose
        members are in the group (``auth.github_teams`` of the policy).""",
    ).tag(config=True)

    async def update_auth_model(self, auth_model):
        auth_model = await super().update_auth_model(auth_model)
        auth_state = auth_model["auth_state"]
        login = auth_state[self.user_auth_state_key].get("login") or auth_model["name"]
        token = auth_state["token_response"]
        entries = sorted({e for es in self.github_teams.values() for e in es})
        member_of = []
        for entry in entries:
            if await self._check_membership_allowed_organizations(
                entry, login, token["access_token"], token.get("token_type", "bearer")
            ):
                member_of.append(entry)
        auth_state[GITHUB_MEMBERSHIPS_KEY] = member_of
        return auth_model

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        member_of = set(auth_state.get(GITHUB_MEMBERSHIPS_KEY) or [])
        return {g for g, es in self.github_teams.items() if g in self.allowed_groups and member_of.intersection(es)}

    def refusal_message(self, auth_model: dict | None) -> str:
        auth_state = (auth_model or {}).get("auth_state") or {}
        login = (auth_state.get(self.user_auth_state_key) or {}).get("login") or (auth_model or {}).get("name", "")
        return (
            f"{NOT_ENTITLED}; GitHub reports that your account {login!r} is not a member of any "
            f"organisation or team that the workbench admits. {_ASK}"
        )


# ---------------------------------------------------------------------------
# Settings (pure, given the environment)
# ---------------------------------------------------------------------------


def _courses(policy: Policy) -> list[str]:
    return [name for name, g in policy.groups.items() if g.kind == "course"]


def _demo_settings(policy: Policy) -> dict[str, dict]:
    auth = policy.auth
    return {
        "JupyterHub": {
            "authenticator_class": _cls(DemoAuthenticator),
            "template_vars": {"announcement_login": f"{policy.name}: log in with a demo account"},
        },
        "DemoAuthenticator": {
            "accounts": {name: u.model_dump() for name, u in auth.demo_users.items()},
            "admin_group_names": ",".join(auth.admin_groups),
            "course_groups": _courses(policy),
        },
        "Authenticator": {"manage_groups": True, "allow_all": False},
    }


def auth_settings(policy: Policy, runtime: Runtime, environ: Mapping[str, str] | None = None) -> dict[str, dict]:
    """The authenticator's traitlets sections for ``policy.auth`` (pure but for reading ``environ``).

    ``environ`` (default ``os.environ``) is only checked for the client secret variable, so that a
    missing secret stops the hub at start-up with a message naming it; the secret's value is not
    part of the result (the authenticator reads it from the hub's environment).
    """
    auth = policy.auth
    if auth.type == "demo":
        return _demo_settings(policy)

    environ = os.environ if environ is None else environ
    problems = []
    if OAUTHENTICATOR_MISSING:
        problems.append(
            (
                "auth.type",
                f"auth type {auth.type!r} needs the Python package oauthenticator (>=17): "
                f"pip install 'oauthenticator>=17,<18' ({OAUTHENTICATOR_MISSING})",
            )
        )
    if not environ.get(auth.client_secret_env):
        problems.append(
            (
                "auth.client_secret_env",
                f"the environment variable {auth.client_secret_env} is not set (or empty); set it to the client "
                f"secret of the OAuth client before starting the workbench",
            )
        )
    if problems:
        raise PolicyError(runtime.config, problems)

    login_service = auth.login_service or DEFAULT_LOGIN_SERVICE[auth.type]
    section: dict[str, Any] = {
        "client_id": auth.client_id,
        "client_secret_env": auth.client_secret_env,
        "scope": list(auth.scope) if auth.scope is not None else list(DEFAULT_SCOPES[auth.type]),
        "login_service": login_service,
        "oauth_callback_url": f"{runtime.public_url}/hub/oauth_callback",
        "allowed_groups": list(policy.groups),
        "admin_groups": list(auth.admin_groups),
        "course_groups": _courses(policy),
    }
    if auth.type == "generic-oauth":
        klass: type = WorkbenchGenericOAuthenticator
        section.update(
            authorize_url=auth.authorize_url,
            token_url=auth.token_url,
            userdata_url=auth.userdata_url,
            username_claim=auth.username_claim,
            auth_state_groups_key=f"{GenericOAuthenticator.user_auth_state_key}.{auth.groups_claim}",
        )
        if getattr(auth, "jwks_url", ""):  # ID-token verification (policy fields auth.jwks_url and auth.issuer)
            section.update(jwks_url=auth.jwks_url, issuer=auth.issuer)
    else:
        klass = WorkbenchGitHubOAuthenticator
        section["github_teams"] = {group: list(entries) for group, entries in auth.github_teams.items()}
        if auth.github_url:
            section["github_url"] = auth.github_url.rstrip("/")
    return {
        "JupyterHub": {
            "authenticator_class": _cls(klass),
            "template_vars": {"announcement_login": f"{policy.name}: sign in with {login_service}"},
        },
        "Authenticator": {"manage_groups": True, "allow_all": False},
        klass.__name__: section,
    }
