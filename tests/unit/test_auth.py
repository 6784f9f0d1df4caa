"""Unit tests of workbench.auth.demo (demo exposure, DemoAuthenticator) and the spawner's profile choice."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from tornado import web

from workbench.auth.demo import ALLOW_FLAG, PASSWORD_ENV, DemoAuthenticator, DemoAuthExposed, check_demo_exposure
from workbench.policy import load_policy
from workbench.spawn.common import choose_profile

DEMO = Path(__file__).resolve().parents[2] / "hub_config" / "demo.yaml"

ACCOUNTS = {
    "researcher": {"groups": ["physics-lab"], "admin": False},
    "admin": {"groups": ["platform-admins"], "admin": False},
    "boss": {"groups": [], "admin": True},
    "multi": {"groups": ["course-ml101", "platform-admins"]},
}


def make_auth(password="s3cret", accounts=ACCOUNTS, admin_groups="platform-admins") -> DemoAuthenticator:
    return DemoAuthenticator(accounts=accounts, admin_group_names=admin_groups, password=password)


def login(auth, username, password):
    return asyncio.run(auth.authenticate(None, {"username": username, "password": password}))


# ---------------------------------------------------------------------------
# check_demo_exposure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost", "::1", "127.0.1.1"])
def test_demo_on_loopback_ok(bind):
    assert check_demo_exposure("demo", bind, False) is None


@pytest.mark.parametrize("bind", ["0.0.0.0", "", "::", "192.168.1.10", "hub.example.org"])
def test_demo_on_network_refused(bind):
    with pytest.raises(DemoAuthExposed) as info:
        check_demo_exposure("demo", bind, False)
    assert str(info.value) == (
        f"auth.type is 'demo' (shared demo password) but the hub would listen on {bind!r}, "
        "which is reachable from the network. Bind to 127.0.0.1 (--bind 127.0.0.1), configure "
        "real SSO in the platform YAML (auth.type: generic-oauth or github), or, for a closed "
        "lab network only, pass --allow-demo-auth-on-network."
    )


def test_demo_on_network_allowed_by_flag():
    assert ALLOW_FLAG == "--allow-demo-auth-on-network"
    assert check_demo_exposure("demo", "0.0.0.0", True) is None


@pytest.mark.parametrize("auth_type", ["github", "generic-oauth"])
def test_real_auth_on_network_ok(auth_type):
    assert check_demo_exposure(auth_type, "0.0.0.0", False) is None


def test_demo_auth_exposed_is_runtime_error():
    assert issubclass(DemoAuthExposed, RuntimeError)


# ---------------------------------------------------------------------------
# DemoAuthenticator
# ---------------------------------------------------------------------------


def test_right_password():
    assert login(make_auth(), "researcher", "s3cret") == {
        "name": "researcher",
        "groups": ["physics-lab"],
        "admin": False,
    }


def test_username_whitespace_stripped():
    assert login(make_auth(), "  researcher ", "s3cret")["name"] == "researcher"


def test_admin_from_admin_group():
    assert login(make_auth(), "admin", "s3cret") == {"name": "admin", "groups": ["platform-admins"], "admin": True}


def test_admin_from_one_of_several_groups():
    assert login(make_auth(), "multi", "s3cret") == {
        "name": "multi",
        "groups": ["course-ml101", "platform-admins"],
        "admin": True,
    }


def test_admin_flag_on_account():
    assert login(make_auth(), "boss", "s3cret") == {"name": "boss", "groups": [], "admin": True}


def test_no_admin_groups_configured():
    auth = make_auth(admin_groups="")
    assert login(auth, "admin", "s3cret")["admin"] is False
    assert login(auth, "boss", "s3cret")["admin"] is True


def test_several_admin_groups():
    auth = make_auth(admin_groups="physics-lab,platform-admins")
    assert login(auth, "researcher", "s3cret")["admin"] is True


def test_wrong_password(caplog):
    with caplog.at_level(logging.WARNING):
        assert login(make_auth(), "researcher", "nope") is None
    assert "wrong password" in caplog.text


@pytest.mark.parametrize("password", ["", "s3cre", "s3cret ", "S3CRET"])
def test_wrong_passwords(password):
    assert login(make_auth(), "researcher", password) is None


def test_missing_fields():
    auth = make_auth()
    assert asyncio.run(auth.authenticate(None, {})) is None
    assert asyncio.run(auth.authenticate(None, {"username": "researcher"})) is None
    assert asyncio.run(auth.authenticate(None, {"username": None, "password": None})) is None


def test_unknown_user(caplog):
    with caplog.at_level(logging.WARNING):
        assert login(make_auth(), "mallory", "s3cret") is None
    assert "unknown account 'mallory'" in caplog.text


def test_empty_configured_password_refuses_everyone(caplog):
    auth = make_auth(password="")
    with caplog.at_level(logging.ERROR):
        assert login(auth, "researcher", "") is None
        assert login(auth, "researcher", "anything") is None
    assert "no demo password configured" in caplog.text


def test_password_default_from_env(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    auth = DemoAuthenticator(accounts=ACCOUNTS)
    assert auth.password == "from-env"
    assert login(auth, "researcher", "from-env")["name"] == "researcher"


def test_password_default_empty_without_env(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    auth = DemoAuthenticator(accounts=ACCOUNTS)
    assert auth.password == ""
    assert login(auth, "researcher", "") is None


def test_authenticator_defaults():
    auth = make_auth()
    assert auth.manage_groups is True
    assert auth.allow_all is False


def test_returned_groups_are_a_copy():
    auth = make_auth()
    result = login(auth, "researcher", "s3cret")
    result["groups"].append("platform-admins")
    assert auth.accounts["researcher"]["groups"] == ["physics-lab"]


def test_check_allowed():
    auth = make_auth()
    assert auth.check_allowed("researcher") is True
    assert auth.check_allowed("admin", {"name": "admin"}) is True
    assert auth.check_allowed("mallory") is False
    assert auth.check_allowed("") is False


def test_accounts_from_policy():
    policy = load_policy(DEMO)
    auth = DemoAuthenticator(
        accounts={n: u.model_dump() for n, u in policy.auth.demo_users.items()},
        admin_group_names=",".join(policy.auth.admin_groups),
        password="pw",
    )
    assert login(auth, "admin", "pw") == {"name": "admin", "groups": ["platform-admins"], "admin": True}
    assert login(auth, "student1", "pw") == {"name": "student1", "groups": ["course-ml101"], "admin": False}


# ---------------------------------------------------------------------------
# spawner.choose_profile: which profile a user may start
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load_policy(DEMO)


def test_default_profile_is_first_entitled(demo):
    assert choose_profile(demo, ["physics-lab"], None) == "cpu-large"
    assert choose_profile(demo, ["physics-lab"], "") == "cpu-large"
    assert choose_profile(demo, ["course-ml101"], None) == "cpu-small"
    # policy order of profiles, not group order
    assert choose_profile(demo, ["physics-lab", "startup-acme"], None) == "cpu-small"


def test_requested_entitled_profile(demo):
    assert choose_profile(demo, ["physics-lab"], "h100-x1") == "h100-x1"
    assert choose_profile(demo, ["course-ml101"], "mig-1g") == "mig-1g"
    assert choose_profile(demo, ["course-ml101", "physics-lab"], "h100-x1") == "h100-x1"


def test_requested_profile_not_entitled(demo):
    with pytest.raises(web.HTTPError) as info:
        choose_profile(demo, ["course-ml101"], "h100-x1")
    assert info.value.status_code == 403
    assert info.value.log_message == (
        "Profile 'h100-x1' is not available to you; your groups may use: cpu-small, mig-1g"
    )


def test_requested_profile_that_does_not_exist(demo):
    with pytest.raises(web.HTTPError) as info:
        choose_profile(demo, ["physics-lab"], "gpu-x8")
    assert info.value.status_code == 403
    assert info.value.log_message == (
        "Profile 'gpu-x8' is not available to you; your groups may use: cpu-large, h100-x1"
    )


def test_user_with_no_groups(demo):
    with pytest.raises(web.HTTPError) as info:
        choose_profile(demo, [], "cpu-small")
    assert info.value.status_code == 403
    assert info.value.log_message == (
        "You are not in any group that may start a server (your groups: none). "
        "Ask the platform team to add you to a group."
    )


def test_user_only_in_unknown_groups(demo):
    with pytest.raises(web.HTTPError) as info:
        choose_profile(demo, ["hr", "finance"], None)
    assert info.value.status_code == 403
    assert info.value.log_message == (
        "You are not in any group that may start a server (your groups: hr, finance). "
        "Ask the platform team to add you to a group."
    )
