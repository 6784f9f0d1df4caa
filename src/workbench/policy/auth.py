"""The policy's ``auth`` section: demo users, OAuth providers, admin groups, and the cross-field checks that
name the field and the fix (pure).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field

from workbench.policy.base import _Model

# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


class DemoUser(_Model):
    """A demo account (embedded mode only)."""

    groups: list[str] = Field(default_factory=list)
    admin: bool = False


class Auth(_Model):
    """How people log in, and how their identity provider's groups become policy groups.

    - ``demo``: the accounts in ``demo_users`` with one shared password (embedded mode only).
    - ``generic-oauth``: any OAuth2 / OpenID Connect provider (a university's SSO: Keycloak,
      Shibboleth OIDC, Azure AD, ...). The provider's ``groups_claim`` lists the user's groups.
    - ``github``: GitHub or GitHub Enterprise (startups). ``github_teams`` maps policy groups to
      GitHub organisations (``acme-inc``) or teams (``acme-inc:ml-team``).

    Only policy groups count: a user whose provider vouches for none of them cannot log in, and
    their hub groups are exactly the policy groups they are in. Members of ``admin_groups`` are
    hub admins. Secrets never go in this file: ``client_secret_env`` names the environment
    variable of the hub that holds the client secret.
    """

    type: Literal["demo", "generic-oauth", "github"] = "demo"
    #: OAuth client (generic-oauth and github)
    client_id: str = ""
    client_secret_env: str = ""
    #: never valid: only declared so that a secret pasted into the YAML gets a precise error
    client_secret: Any = Field(default=None, repr=False, exclude=True)
    scope: list[str] | None = None  # None: the type's default (see workbench.auth.oauth.DEFAULT_SCOPES)
    login_service: str = ""  # the text of the login button ("Sign in with <login_service>")
    #: generic-oauth: the provider's endpoints (from its /.well-known/openid-configuration) and claims
    authorize_url: str = ""
    token_url: str = ""
    userdata_url: str = ""
    #: generic-oauth: verify the provider's ID tokens (signature by a key of jwks_url, iss, aud, expiry)
    jwks_url: str = ""
    issuer: str = ""
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"  # a claim name, or a dotted path into nested claims (realm_access.roles)
    #: github: GitHub Enterprise URL (default https://github.com) and group -> organisations / teams
    github_url: str = ""
    github_teams: dict[str, list[str]] = Field(default_factory=dict)
    admin_groups: list[str] = Field(default_factory=list)
    demo_users: dict[str, DemoUser] = Field(default_factory=dict)


_OAUTH = ("generic-oauth", "github")
#: auth fields and the auth types that use them (demo_users has its own check)
_AUTH_FIELD_TYPES: dict[str, tuple[str, ...]] = {
    "client_id": _OAUTH,
    "client_secret_env": _OAUTH,
    "scope": _OAUTH,
    "login_service": _OAUTH,
    "authorize_url": ("generic-oauth",),
    "token_url": ("generic-oauth",),
    "userdata_url": ("generic-oauth",),
    "jwks_url": ("generic-oauth",),
    "issuer": ("generic-oauth",),
    "username_claim": ("generic-oauth",),
    "groups_claim": ("generic-oauth",),
    "github_url": ("github",),
    "github_teams": ("github",),
}
#: required fields per auth type, with what to put there
_AUTH_REQUIRED: dict[str, dict[str, str]] = {
    "generic-oauth": {
        "client_id": "the client ID of the OAuth client registered with your identity provider",
        "client_secret_env": (
            "the NAME of the hub's environment variable that holds the client secret "
            "(e.g. client_secret_env: WORKBENCH_OAUTH_CLIENT_SECRET); the secret itself never goes in this file"
        ),
        "authorize_url": (
            "the provider's authorization endpoint, where users log in "
            "(e.g. https://sso.example.edu/oauth2/authorize; 'authorization_endpoint' in /.well-known/openid-configuration)"
        ),
        "token_url": (
            "the provider's token endpoint, where the hub exchanges the login code for tokens "
            "(e.g. https://sso.example.edu/oauth2/token; 'token_endpoint' in /.well-known/openid-configuration)"
        ),
        "userdata_url": (
            "the provider's userinfo endpoint, which returns the user's claims including groups "
            "(e.g. https://sso.example.edu/oauth2/userinfo; 'userinfo_endpoint' in /.well-known/openid-configuration)"
        ),
    },
    "github": {
        "client_id": "the client ID of the GitHub OAuth app",
        "client_secret_env": (
            "the NAME of the hub's environment variable that holds the GitHub OAuth app's client secret "
            "(e.g. client_secret_env: WORKBENCH_GITHUB_CLIENT_SECRET); the secret itself never goes in this file"
        ),
        "github_teams": (
            "at least one policy group mapped to GitHub organisations or teams, e.g. "
            "github_teams: {startup-acme: [acme-inc, 'acme-inc:ml-team']}; nobody could log in otherwise"
        ),
    },
}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GITHUB_ENTRY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?::[A-Za-z0-9._-]+)?$")


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an identity provider endpoint (None: it can)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"must be an absolute https:// URL, got {url!r}"
    if parts.scheme == "http" and not (parts.hostname == "localhost" or _is_loopback_ip(parts.hostname)):
        return (
            f"must use https:// (tokens and user data travel over it); plain http is only accepted for a "
            f"provider on this machine (localhost, 127.0.0.1, ::1), got {url!r}"
        )
    return None


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
