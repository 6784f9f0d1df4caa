"""Unit tests of workbench.auth.oauth (authenticator settings, robust group claims) and the policy's auth checks."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml
from tornado import web
from traitlets.config import Config

from workbench.auth.demo import DemoAuthenticator
from workbench.auth.oauth import (
    NOT_ENTITLED,
    WorkbenchGenericOAuthenticator,
    WorkbenchGitHubOAuthenticator,
    auth_settings,
    lookup_claim,
    parse_groups_claim,
    refusal_message,
)
from workbench.embedded.hub import apply_settings, hub_settings
from workbench.policy import PolicyError, load_policy, parse_policy
from workbench.runtime import SECRET_NAMES, Runtime

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hub_config" / "demo.yaml"
SECRET_ENV = "WB_TEST_OAUTH_SECRET"
ENV = {SECRET_ENV: "s3cret-value"}
ASK = "If you think you should have access, ask the platform team to add you to one of the workbench's groups."


def runtime(**kw) -> Runtime:
    values = dict(
        config="/srv/wb/platform.yaml",
        state_dir="/srv/wb/state",
        hub_config_dir="/srv/wb/hub_config",
        venv_bin="/srv/wb/.venv/bin",
        proxy_command="/usr/bin/configurable-http-proxy",
        port=8000,
    )
    values.update(kw)
    return Runtime(**values)


def demo_data() -> dict:
    return yaml.safe_load(DEMO.read_text())


GENERIC_AUTH = {
    "type": "generic-oauth",
    "client_id": "workbench",
    "client_secret_env": SECRET_ENV,
    "authorize_url": "https://sso.example.edu/oauth2/authorize",
    "token_url": "https://sso.example.edu/oauth2/token",
    "userdata_url": "https://sso.example.edu/oauth2/userinfo",
    "admin_groups": ["platform-admins"],
}

GITHUB_AUTH = {
    "type": "github",
    "client_id": "Iv1.abc",
    "client_secret_env": SECRET_ENV,
    "github_teams": {"startup-acme": ["acme-inc"], "platform-admins": ["our-centre:platform"]},
    "admin_groups": ["platform-admins"],
}


def policy_with(auth: dict):
    data = demo_data()
    data["auth"] = copy.deepcopy(auth)
    return parse_policy(data)


def problems_of(auth: dict) -> list[tuple[str, str]]:
    data = demo_data()
    data["auth"] = auth
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    return info.value.problems


# ---------------------------------------------------------------------------
# auth_settings: literal expected dicts
# ---------------------------------------------------------------------------


def test_demo_settings():
    assert auth_settings(load_policy(DEMO), runtime(), environ={}) == {
        "JupyterHub": {
            "authenticator_class": "workbench.auth.demo.DemoAuthenticator",
            "template_vars": {"announcement_login": "Workbench demo: log in with a demo account"},
        },
        "DemoAuthenticator": {
            "accounts": {
                "researcher": {"groups": ["physics-lab"], "admin": False},
                "instructor": {"groups": ["course-ml101"], "admin": False},
                "student1": {"groups": ["course-ml101"], "admin": False},
                "student2": {"groups": ["course-ml101"], "admin": False},
                "startup": {"groups": ["startup-acme"], "admin": False},
                "admin": {"groups": ["platform-admins"], "admin": False},
            },
            "admin_group_names": "platform-admins",
            "course_groups": ["course-ml101"],
        },
        "Authenticator": {"manage_groups": True, "allow_all": False},
    }


def test_generic_oauth_settings():
    assert auth_settings(policy_with(GENERIC_AUTH), runtime(port=8443), environ=ENV) == {
        "JupyterHub": {
            "authenticator_class": "workbench.auth.oauth.WorkbenchGenericOAuthenticator",
            "template_vars": {"announcement_login": "Workbench demo: sign in with single sign-on"},
        },
        "Authenticator": {"manage_groups": True, "allow_all": False},
        "WorkbenchGenericOAuthenticator": {
            "client_id": "workbench",
            "client_secret_env": SECRET_ENV,
            "scope": ["openid", "profile", "email"],
            "login_service": "single sign-on",
            "oauth_callback_url": "http://127.0.0.1:8443/hub/oauth_callback",
            "allowed_groups": ["physics-lab", "course-ml101", "startup-acme", "platform-admins"],
            "admin_groups": ["platform-admins"],
            "course_groups": ["course-ml101"],
            "authorize_url": "https://sso.example.edu/oauth2/authorize",
            "token_url": "https://sso.example.edu/oauth2/token",
            "userdata_url": "https://sso.example.edu/oauth2/userinfo",
            "username_claim": "preferred_username",
            "auth_state_groups_key": "oauth_user.groups",
        },
    }


def test_generic_oauth_settings_with_options():
    auth = dict(
        GENERIC_AUTH,
        scope=["openid", "groups"],
        login_service="Uni SSO",
        username_claim="sub",
        groups_claim="realm_access.roles",
    )
    s = auth_settings(policy_with(auth), runtime(bind="0.0.0.0"), environ=ENV)
    section = s["WorkbenchGenericOAuthenticator"]
    assert section["scope"] == ["openid", "groups"]
    assert section["login_service"] == "Uni SSO"
    assert section["username_claim"] == "sub"
    assert section["auth_state_groups_key"] == "oauth_user.realm_access.roles"
    assert section["oauth_callback_url"] == "http://127.0.0.1:8000/hub/oauth_callback"
    assert s["JupyterHub"]["template_vars"] == {"announcement_login": "Workbench demo: sign in with Uni SSO"}


def test_github_settings():
    auth = dict(GITHUB_AUTH, github_url="https://github.acme.example/")
    assert auth_settings(policy_with(auth), runtime(), environ=ENV) == {
        "JupyterHub": {
            "authenticator_class": "workbench.auth.oauth.WorkbenchGitHubOAuthenticator",
            "template_vars": {"announcement_login": "Workbench demo: sign in with GitHub"},
        },
        "Authenticator": {"manage_groups": True, "allow_all": False},
        "WorkbenchGitHubOAuthenticator": {
            "client_id": "Iv1.abc",
            "client_secret_env": SECRET_ENV,
            "scope": ["read:org"],
            "login_service": "GitHub",
            "oauth_callback_url": "http://127.0.0.1:8000/hub/oauth_callback",
            "allowed_groups": ["physics-lab", "course-ml101", "startup-acme", "platform-admins"],
            "admin_groups": ["platform-admins"],
            "course_groups": ["course-ml101"],
            "github_teams": {"startup-acme": ["acme-inc"], "platform-admins": ["our-centre:platform"]},
            "github_url": "https://github.acme.example",
        },
    }


@pytest.mark.parametrize("environ", [{}, {SECRET_ENV: ""}])
def test_missing_client_secret_is_a_clear_error(environ):
    with pytest.raises(PolicyError) as info:
        auth_settings(policy_with(GENERIC_AUTH), runtime(), environ=environ)
    assert info.value.source == "/srv/wb/platform.yaml"
    assert info.value.problems == [
        (
            "auth.client_secret_env",
            f"the environment variable {SECRET_ENV} is not set (or empty); set it to the client secret of the "
            "OAuth client before starting the workbench",
        )
    ]


def test_secret_value_is_not_in_the_settings():
    s = auth_settings(policy_with(GENERIC_AUTH), runtime(), environ=ENV)
    assert "s3cret-value" not in repr(s)


def test_hub_settings_use_auth_settings(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    secrets = {k: "ab" * 32 for k in SECRET_NAMES}
    s = hub_settings(policy_with(GENERIC_AUTH), runtime(), secrets)
    assert s["JupyterHub"]["authenticator_class"] == "workbench.auth.oauth.WorkbenchGenericOAuthenticator"
    assert "DemoAuthenticator" not in s
    assert s["Authenticator"] == {"manage_groups": True, "allow_all": False}
    assert s["WorkbenchGenericOAuthenticator"]["token_url"] == "https://sso.example.edu/oauth2/token"
    assert "spawner_class" in s["JupyterHub"] and "Spawner" in s


def _authenticator_from_settings(settings: dict, klass):
    c = Config()
    apply_settings(c, settings)
    return klass(config=c)


def test_settings_load_into_the_real_authenticator(monkeypatch):
    """The settings, applied as traitlets config, give a working authenticator (observers, types)."""
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    a = _authenticator_from_settings(
        auth_settings(policy_with(GENERIC_AUTH), runtime(), environ=ENV), WorkbenchGenericOAuthenticator
    )
    assert a.manage_groups is True and a.allow_all is False
    assert a.client_secret == "s3cret-value"
    assert a.allowed_groups == {"physics-lab", "course-ml101", "startup-acme", "platform-admins"}
    assert a.admin_groups == {"platform-admins"}
    assert a.auth_state_groups_key == "oauth_user.groups"
    assert a.get_callback_url() == "http://127.0.0.1:8000/hub/oauth_callback"

    g = _authenticator_from_settings(
        auth_settings(policy_with(GITHUB_AUTH), runtime(), environ=ENV), WorkbenchGitHubOAuthenticator
    )
    assert g.client_secret == "s3cret-value"  # not GITHUB_CLIENT_SECRET
    assert g.github_teams == {"startup-acme": ["acme-inc"], "platform-admins": ["our-centre:platform"]}
    assert g.authorize_url == "https://github.com/login/oauth/authorize"


def test_authenticator_refuses_to_start_without_secret(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{SECRET_ENV} \\(auth.client_secret_env\\) is not set or empty"):
        WorkbenchGenericOAuthenticator(client_secret_env=SECRET_ENV)


# ---------------------------------------------------------------------------
# Reading the groups claim (pure)
# ---------------------------------------------------------------------------


def test_lookup_claim():
    state = {"oauth_user": {"groups": ["a"], "realm_access": {"roles": ["r"]}, "https://uni.example/groups": ["u"]}}
    assert lookup_claim(state, "oauth_user.groups") == (True, ["a"])
    assert lookup_claim(state, "oauth_user.realm_access.roles") == (True, ["r"])
    assert lookup_claim(state, "oauth_user.https://uni.example/groups") == (True, ["u"])
    assert lookup_claim(state, "oauth_user.missing") == (False, None)
    assert lookup_claim(state, "oauth_user.groups.deeper") == (False, None)
    assert lookup_claim({"oauth_user": "not an object"}, "oauth_user.groups") == (False, None)
    assert lookup_claim({"oauth_user": {"groups": None}}, "oauth_user.groups") == (True, None)


@pytest.mark.parametrize(
    "value, expected",
    [
        (["a", "b", "a"], ["a", "b"]),
        ([], []),
        ("physics-lab", None),
        (["physics-lab", 3], None),
        ([{"name": "physics-lab"}], None),
        ({"physics-lab": True}, None),
        (None, None),
        (True, None),
    ],
)
def test_parse_groups_claim(value, expected):
    assert parse_groups_claim(value) == expected


@pytest.mark.parametrize(
    "found, value, sent",
    [
        (False, None, "your identity provider sent no 'groups' claim"),
        (True, [], "your identity provider sent groups: none (an empty list)"),
        (True, ["history", "maths"], 'your identity provider sent groups: "history", "maths"'),
        (
            True,
            "physics-lab",
            "your identity provider sent a malformed 'groups' claim (expected a list of group names, "
            'got a string: "physics-lab")',
        ),
        (
            True,
            ["physics-lab", 3],
            "your identity provider sent a malformed 'groups' claim (expected a list of group names, "
            "got a list containing 3 (a number))",
        ),
        (
            True,
            {"physics-lab": True},
            "your identity provider sent a malformed 'groups' claim (expected a list of group names, "
            'got an object: {"physics-lab": true})',
        ),
        (
            True,
            None,
            "your identity provider sent a malformed 'groups' claim (expected a list of group names, got null)",
        ),
    ],
)
def test_refusal_message(found, value, sent):
    assert refusal_message("groups", found, value) == f"{NOT_ENTITLED}; {sent}. {ASK}"


def test_refusal_message_lists_at_most_20_groups():
    msg = refusal_message("groups", True, [f"g{i}" for i in range(25)])
    assert '"g19" and 5 more.' in msg and '"g20"' not in msg


# ---------------------------------------------------------------------------
# The authenticators, without a network (token_to_user and GitHub's API faked)
# ---------------------------------------------------------------------------


@pytest.fixture
def generic(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    return _authenticator_from_settings(
        auth_settings(policy_with(GENERIC_AUTH), runtime(), environ=ENV), WorkbenchGenericOAuthenticator
    )


def _login(authenticator, user_info: dict) -> dict:
    async def token_to_user(token_info):
        return user_info

    authenticator.token_to_user = token_to_user

    async def run():
        model = await authenticator._token_to_auth_model({"access_token": "t", "token_type": "Bearer"})
        assert await authenticator.check_allowed(model["name"], model) is True
        return model

    return asyncio.run(run())


def _refused(authenticator, user_info: dict) -> str:
    with pytest.raises(web.HTTPError) as info:
        _login(authenticator, user_info)
    assert info.value.status_code == 403
    return info.value.log_message.replace("%%", "%")


def test_entitled_user_gets_only_policy_groups(generic):
    model = _login(generic, {"preferred_username": "Alice", "groups": ["maths", "physics-lab", "course-ml101"]})
    assert model["name"] == "alice"
    assert model["groups"] == ["course-ml101", "physics-lab"]
    assert model["admin"] is False


def test_admin_group_makes_admin(generic):
    model = _login(generic, {"preferred_username": "root", "groups": ["platform-admins"]})
    assert model["groups"] == ["platform-admins"] and model["admin"] is True


@pytest.mark.parametrize(
    "claims, detail",
    [
        ({}, "sent no 'groups' claim"),
        ({"groups": []}, "sent groups: none (an empty list)"),
        ({"groups": ["history", "staff"]}, 'sent groups: "history", "staff"'),
        # OAuthenticator 17 turns this string into the groups p, h, y, s, ... (one per character)
        (
            {"groups": "physics-lab"},
            "malformed 'groups' claim (expected a list of group names, got a string: \"physics-lab\")",
        ),
        # ... crashes with a 500 (sorting str and int) on this one
        ({"groups": ["physics-lab", 3]}, "got a list containing 3 (a number)"),
        # ... and lets this one in as physics-lab (the keys of the object)
        ({"groups": {"physics-lab": True}}, 'got an object: {"physics-lab": true}'),
        ({"groups": [{"name": "physics-lab"}]}, 'got a list containing {"name": "physics-lab"} (an object)'),
        ({"groups": None}, "got null"),
    ],
)
def test_users_without_policy_group_get_a_clear_403(generic, claims, detail):
    message = _refused(generic, {"preferred_username": "bob", **claims})
    assert message.startswith(NOT_ENTITLED + "; your identity provider ")
    assert detail in message


def test_nested_groups_claim(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    auth = dict(GENERIC_AUTH, groups_claim="realm_access.roles")
    a = _authenticator_from_settings(
        auth_settings(policy_with(auth), runtime(), environ=ENV), WorkbenchGenericOAuthenticator
    )
    model = _login(a, {"preferred_username": "c", "realm_access": {"roles": ["startup-acme", "offline_access"]}})
    assert model["groups"] == ["startup-acme"]
    assert "no 'realm_access.roles' claim" in _refused(a, {"preferred_username": "c", "groups": ["startup-acme"]})


@pytest.mark.parametrize(
    "user_info", [{"groups": ["physics-lab"]}, {"preferred_username": "", "groups": []}, {"preferred_username": 42}]
)
def test_missing_username_claim_is_a_403_not_a_500(generic, user_info):
    message = _refused(generic, user_info)
    assert "did not send your user name (no usable 'preferred_username' claim)" in message


@pytest.mark.parametrize(
    "username, problem",
    [
        ("ali:ce", "the user name 'ali:ce' contains a colon (':')"),
        ("a/b", "the user name 'a/b' contains a slash ('/')"),
        ("bob\nroot", "the user name 'bob\\nroot' contains a control character (0xa)"),
        ("..", "the user name '..' is only dots"),
    ],
)
def test_names_without_an_account_are_refused_at_login_with_a_403(generic, username, problem):
    message = _refused(generic, {"preferred_username": username, "groups": ["physics-lab"]})
    assert message.startswith(
        f"You cannot log in: {problem} (the 'preferred_username' claim of your identity provider)"
    )
    assert "auth.username_claim" in message


def test_validate_username_refuses_names_without_an_account(generic):
    assert generic.validate_username("alice") is True
    assert generic.validate_username("a:b") is False
    assert DemoAuthenticator().validate_username("a:b") is False
    assert DemoAuthenticator().validate_username("g-physics-lab") is True


def test_github_groups_from_org_and_team_membership(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    g = _authenticator_from_settings(
        auth_settings(policy_with(GITHUB_AUTH), runtime(), environ=ENV), WorkbenchGitHubOAuthenticator
    )
    memberships = {"founder": {"acme-inc"}, "ops": {"acme-inc", "our-centre:platform"}, "stranger": set()}
    asked = []

    async def check(entry, username, access_token, token_type):
        asked.append((entry, username, access_token))
        return entry in memberships[username]

    g._check_membership_allowed_organizations = check
    model = _login(g, {"login": "founder", "email": "f@acme.example"})
    assert model["groups"] == ["startup-acme"] and model["admin"] is False
    assert sorted(asked) == [("acme-inc", "founder", "t"), ("our-centre:platform", "founder", "t")]
    model = _login(g, {"login": "ops", "email": None})
    assert model["groups"] == ["platform-admins", "startup-acme"] and model["admin"] is True
    message = _refused(g, {"login": "stranger", "email": None})
    assert message.startswith(f"{NOT_ENTITLED}; GitHub reports that your account 'stranger' is not a member")


# ---------------------------------------------------------------------------
# Policy validation of auth
# ---------------------------------------------------------------------------


def test_valid_oauth_policies():
    assert policy_with(GENERIC_AUTH).auth.type == "generic-oauth"
    assert policy_with(GITHUB_AUTH).auth.github_teams["startup-acme"] == ["acme-inc"]
    # plain http is fine for a provider on this machine (tests, a local Keycloak)
    local = dict(
        GENERIC_AUTH,
        authorize_url="http://127.0.0.1:9000/a",
        token_url="http://localhost:9000/t",
        userdata_url="http://[::1]:9000/u",
    )
    assert policy_with(local).auth.token_url == "http://localhost:9000/t"


def test_generic_oauth_required_fields():
    assert problems_of({"type": "generic-oauth"}) == [
        (
            "auth.client_id",
            "auth type 'generic-oauth' needs the client ID of the OAuth client registered with your identity provider",
        ),
        (
            "auth.client_secret_env",
            "auth type 'generic-oauth' needs the NAME of the hub's environment variable that holds the client secret (e.g. client_secret_env: WORKBENCH_OAUTH_CLIENT_SECRET); the secret itself never goes in this file",
        ),
        (
            "auth.authorize_url",
            "auth type 'generic-oauth' needs the provider's authorization endpoint, where users log in (e.g. https://sso.example.edu/oauth2/authorize; 'authorization_endpoint' in /.well-known/openid-configuration)",
        ),
        (
            "auth.token_url",
            "auth type 'generic-oauth' needs the provider's token endpoint, where the hub exchanges the login code for tokens (e.g. https://sso.example.edu/oauth2/token; 'token_endpoint' in /.well-known/openid-configuration)",
        ),
        (
            "auth.userdata_url",
            "auth type 'generic-oauth' needs the provider's userinfo endpoint, which returns the user's claims including groups (e.g. https://sso.example.edu/oauth2/userinfo; 'userinfo_endpoint' in /.well-known/openid-configuration)",
        ),
    ]


def test_github_required_fields():
    assert problems_of({"type": "github"}) == [
        ("auth.client_id", "auth type 'github' needs the client ID of the GitHub OAuth app"),
        (
            "auth.client_secret_env",
            "auth type 'github' needs the NAME of the hub's environment variable that holds the GitHub OAuth app's client secret (e.g. client_secret_env: WORKBENCH_GITHUB_CLIENT_SECRET); the secret itself never goes in this file",
        ),
        (
            "auth.github_teams",
            "auth type 'github' needs at least one policy group mapped to GitHub organisations or teams, e.g. github_teams: {startup-acme: [acme-inc, 'acme-inc:ml-team']}; nobody could log in otherwise",
        ),
    ]


def test_secret_in_yaml_is_refused():
    assert problems_of(dict(GENERIC_AUTH, client_secret="hunter2")) == [
        (
            "auth.client_secret",
            "secrets never go in the platform YAML: remove it, put the secret in an environment "
            "variable of the hub and name that variable in auth.client_secret_env",
        ),
    ]


def test_secret_in_yaml_is_not_echoed():
    with pytest.raises(PolicyError) as info:
        parse_policy(dict(demo_data(), auth=dict(GENERIC_AUTH, client_secret="hunter2")))
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("name", ["a8f7-93kd", "has space", "1STARTS_WITH_DIGIT"])
def test_client_secret_env_must_be_a_variable_name(name):
    assert problems_of(dict(GENERIC_AUTH, client_secret_env=name)) == [
        (
            "auth.client_secret_env",
            "must be the NAME of an environment variable (letters, digits and '_', not "
            "starting with a digit), like WORKBENCH_OAUTH_CLIENT_SECRET, never the secret itself",
        ),
    ]


@pytest.mark.parametrize(
    "url, why",
    [
        (
            "http://sso.example.edu/token",
            "must use https:// (tokens and user data travel over it); plain http is only "
            "accepted for a provider on this machine (localhost, 127.0.0.1, ::1), got 'http://sso.example.edu/token'",
        ),
        ("sso.example.edu/token", "must be an absolute https:// URL, got 'sso.example.edu/token'"),
        ("ftp://sso.example.edu/token", "must be an absolute https:// URL, got 'ftp://sso.example.edu/token'"),
    ],
)
def test_provider_urls(url, why):
    assert problems_of(dict(GENERIC_AUTH, token_url=url)) == [("auth.token_url", why)]


def test_fields_of_another_auth_type_are_refused():
    assert problems_of(
        dict(GENERIC_AUTH, github_teams={"startup-acme": ["acme-inc"]}, github_url="https://x.example")
    ) == [
        ("auth.github_teams", "only used with auth type 'github', not 'generic-oauth'; remove it"),
        ("auth.github_url", "only used with auth type 'github', not 'generic-oauth'; remove it"),
    ]
    assert problems_of(dict(GITHUB_AUTH, token_url="https://x.example/t", groups_claim="teams")) == [
        ("auth.groups_claim", "only used with auth type 'generic-oauth', not 'github'; remove it"),
        ("auth.token_url", "only used with auth type 'generic-oauth', not 'github'; remove it"),
    ]
    data = demo_data()
    data["auth"]["client_id"] = "x"
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    assert info.value.problems == [
        ("auth.client_id", "only used with auth types 'generic-oauth' and 'github', not 'demo'; remove it")
    ]


def test_demo_users_only_for_demo():
    assert problems_of(dict(GENERIC_AUTH, demo_users={"alice": {"groups": ["physics-lab"]}})) == [
        ("auth.demo_users", "demo users are only allowed with auth type 'demo', not 'generic-oauth'"),
    ]


def test_empty_claim_names_and_scopes():
    assert problems_of(dict(GENERIC_AUTH, groups_claim=" ", scope=["openid", "two words", ""])) == [
        ("auth.scope[1]", "must be one scope name without spaces, got 'two words'"),
        ("auth.scope[2]", "must be one scope name without spaces, got ''"),
        ("auth.groups_claim", "must name a claim of the provider's user info (e.g. 'groups')"),
    ]


def test_github_checks():
    auth = dict(
        GITHUB_AUTH,
        scope=["read:user"],
        github_url="http://github.acme.example",
        github_teams={"startup-acme": ["acme inc"], "ghosts": ["acme-inc"], "physics-lab": []},
    )
    assert problems_of(auth) == [
        (
            "auth.github_url",
            "must use https:// (tokens and user data travel over it); plain http is only accepted "
            "for a provider on this machine (localhost, 127.0.0.1, ::1), got 'http://github.acme.example'",
        ),
        ("auth.scope", "GitHub needs the 'read:org' scope to see organisation and team membership; add it"),
        (
            "auth.github_teams.startup-acme[0]",
            "expected a GitHub organisation ('acme-inc') or organisation:team "
            "('acme-inc:ml-team') as they appear in github.com URLs, got 'acme inc'",
        ),
        (
            "auth.github_teams.ghosts",
            "unknown group 'ghosts'; define it under 'groups' or use one of: "
            "course-ml101, physics-lab, platform-admins, startup-acme",
        ),
        ("auth.github_teams.physics-lab", "list at least one GitHub organisation or organisation:team"),
    ]


def test_admin_groups_must_be_policy_groups_for_oauth_too():
    assert problems_of(dict(GENERIC_AUTH, admin_groups=["root"])) == [
        (
            "auth.admin_groups[0]",
            "unknown group 'root'; define it under 'groups' or use one of: "
            "course-ml101, physics-lab, platform-admins, startup-acme",
        ),
    ]


# ---------------------------------------------------------------------------
# ID tokens: signature, issuer, audience (auth.jwks_url / auth.issuer)
# ---------------------------------------------------------------------------

ISSUER = "https://sso.example.edu/realms/uni"


def _rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _serve_jwks(key, kid: str = "k1"):
    """A local HTTP server publishing ``key``'s public half as a JWKS (PyJWKClient reads http(s) only)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import jwt

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/jwks"


def _id_token(key, kid: str = "k1", **claims) -> str:
    import time

    import jwt

    body = {"iss": ISSUER, "aud": "workbench", "sub": "u-1", "exp": int(time.time()) + 300, "iat": int(time.time())}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def verifying(monkeypatch):
    """The generic authenticator from a policy with auth.jwks_url (a file: URL of the test's key set) and issuer."""
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    key = _rsa_key()
    auth = {**GENERIC_AUTH, "jwks_url": "https://sso.example.edu/jwks", "issuer": ISSUER}
    settings = auth_settings(policy_with(auth), runtime(), environ=ENV)
    assert settings["WorkbenchGenericOAuthenticator"]["jwks_url"] == "https://sso.example.edu/jwks"
    assert settings["WorkbenchGenericOAuthenticator"]["issuer"] == ISSUER
    a = _authenticator_from_settings(settings, WorkbenchGenericOAuthenticator)
    server, a.jwks_url = _serve_jwks(key)
    yield a, key
    server.shutdown()
    server.server_close()


def test_a_token_signed_by_the_providers_key_for_this_client_is_accepted(verifying):
    a, key = verifying
    claims = a.verify_id_token(_id_token(key))
    assert claims["sub"] == "u-1" and claims["iss"] == ISSUER and claims["aud"] == "workbench"


@pytest.mark.parametrize(
    "why",
    ["another key", "another issuer", "another audience", "expired", "unsigned", "no token", "another kid"],
)
def test_id_tokens_that_are_not_the_providers_for_this_client_are_refused(verifying, why):
    import time

    import jwt

    a, key = verifying
    token = {
        "another key": lambda: _id_token(_rsa_key()),
        "another issuer": lambda: _id_token(key, iss="https://evil.example.com"),
        "another audience": lambda: _id_token(key, aud="some-other-client"),
        "expired": lambda: _id_token(key, exp=int(time.time()) - 600),
        "unsigned": lambda: jwt.encode({"iss": ISSUER, "aud": "workbench", "sub": "u"}, None, algorithm="none"),
        "no token": lambda: None,
        "another kid": lambda: _id_token(_rsa_key(), kid="k2"),
    }[why]()
    with pytest.raises(web.HTTPError) as info:
        a.verify_id_token(token)
    assert info.value.status_code == 403
    message = info.value.log_message
    expected = {
        "another key": "Signature verification failed",
        "another issuer": "Invalid issuer",
        "another audience": "Audience doesn't match",
        "expired": "Signature has expired",
        "unsigned": "is not valid",
        "no token": "sent no ID token",
        "another kid": "Unable to find a signing key",
    }[why]
    assert message.startswith("Login refused:") and expected in message, message


def test_the_login_verifies_the_id_token_before_reading_the_user_info(verifying):
    """token_to_user refuses a bad ID token before it asks the userinfo endpoint (never reached here)."""
    a, key = verifying
    asked = []

    async def fetch(*args, **kwargs):  # the userinfo request of OAuthenticator
        asked.append(args)
        return {"preferred_username": "alice", "groups": ["physics-lab"]}

    a.httpfetch = fetch
    info = {"access_token": "t", "token_type": "Bearer"}
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(a.token_to_user({**info, "id_token": _id_token(key, aud="another")}))
    assert refused.value.status_code == 403 and asked == []
    assert asyncio.run(a.token_to_user({**info, "id_token": _id_token(key)}))["preferred_username"] == "alice"
    assert len(asked) == 1


@pytest.mark.parametrize(
    "auth, field, words",
    [
        ({"jwks_url": "https://sso.example.edu/jwks"}, "auth.issuer", "set auth.issuer too"),
        ({"issuer": ISSUER}, "auth.jwks_url", "set auth.jwks_url too"),
        ({"jwks_url": "sso/jwks", "issuer": ISSUER}, "auth.jwks_url", ""),
    ],
)
def test_id_token_verification_needs_both_fields(auth, field, words):
    problems = dict(problems_of({**GENERIC_AUTH, **auth}))
    assert field in problems and words in problems[field], problems


def test_id_token_fields_only_for_generic_oauth():
    problems = dict(problems_of({**GITHUB_AUTH, "jwks_url": "https://x.example/jwks", "issuer": ISSUER}))
    assert "only used with auth type 'generic-oauth'" in problems["auth.jwks_url"]
