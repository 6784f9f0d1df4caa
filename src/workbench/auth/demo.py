"""Authentication for the embedded mode: demo accounts from the policy, one shared password.

Demo auth exists so that an evaluator can try every kind of user on one machine. It must never
reach a network by accident: :func:`check_demo_exposure` refuses it on a non-loopback bind
address unless the operator passes an explicit flag, and the hub configuration calls it too,
so starting ``jupyterhub -f hub_config/jupyterhub_config.py`` by hand cannot bypass it.
"""

from __future__ import annotations

import hmac
import os

from jupyterhub.auth import Authenticator
from traitlets import Dict, Unicode, default

from workbench.auth.groups import RosterLoginMixin
from workbench.runtime import is_loopback

PASSWORD_ENV = "WORKBENCH_DEMO_PASSWORD"
ALLOW_FLAG = "--allow-demo-auth-on-network"


class DemoAuthExposed(RuntimeError):
    pass


def check_demo_exposure(auth_type: str, bind: str, allowed: bool) -> None:
    """Refuse demo auth on a non-loopback address unless explicitly allowed (pure)."""
    if auth_type != "demo" or allowed or is_loopback(bind):
        return
    raise DemoAuthExposed(
        f"auth.type is 'demo' (shared demo password) but the hub would listen on {bind!r}, "
        f"which is reachable from the network. Bind to 127.0.0.1 (--bind 127.0.0.1), configure "
        f"real SSO in the platform YAML (auth.type: generic-oauth or github), or, for a closed "
        f"lab network only, pass {ALLOW_FLAG}."
    )


class DemoAuthenticator(RosterLoginMixin, Authenticator):
    """Log in the demo accounts named in the policy (``auth.demo_users``) with one password.

    Each account's groups come from the policy, plus the courses whose roster lists it
    (:mod:`workbench.services.rosters.app`), and are synchronised into the hub on every login
    (``manage_groups``); members of ``auth.admin_groups`` become hub admins. Anyone else is
    refused.
    """

    accounts = Dict(
        help="""Demo accounts: ``{name: {"groups": [...], "admin": bool}}``, from ``auth.demo_users``.""",
    ).tag(config=True)

    admin_group_names = Unicode(
        "",
        help="Comma-separated groups whose members are hub admins (``auth.admin_groups``).",
    ).tag(config=True)

    password = Unicode(
        help=f"""The demo password. Defaults to ${PASSWORD_ENV}, which `workbench up` sets
        (generating one if you did not).""",
    ).tag(config=True)

    @default("password")
    def _default_password(self):
        return os.environ.get(PASSWORD_ENV, "")

    @default("manage_groups")
    def _default_manage_groups(self):
        return True

    @default("allow_all")
    def _default_allow_all(self):
        return False

    def _is_admin(self, name: str) -> bool:
        acct = self.accounts.get(name, {})
        admins = {g for g in self.admin_group_names.split(",") if g}
        return bool(acct.get("admin")) or bool(admins.intersection(acct.get("groups", [])))

    async def authenticate(self, handler, data):
        name = (data.get("username") or "").strip()
        password = data.get("password") or ""
        if not self.password:
            self.log.error("Demo login refused: no demo password configured (%s is empty)", PASSWORD_ENV)
            return None
        if name not in self.accounts:
            self.log.warning("Demo login refused for unknown account %r", name)
            return None
        if not hmac.compare_digest(password.encode(), self.password.encode()):
            self.log.warning("Demo login refused for %r: wrong password", name)
            return None
        groups = list(self.accounts[name].get("groups", []))
        # plus the courses whose roster lists the account (workbench.services.rosters.app), which manage_groups would drop
        groups = self.groups_with_rosters(getattr(handler, "db", None), self.normalize_username(name), groups)
        return {
            "name": name,
            "groups": groups,
            "admin": self._is_admin(name),
        }

    def check_allowed(self, username, authentication=None):
        return username in self.accounts
