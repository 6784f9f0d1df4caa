"""The local spawner of the embedded mode: single-user JupyterLab servers as local processes.

As root, each hub user runs as their own Unix account (``wb-<name>``, home 0700), so users
cannot read each other's files. Not as root, every server runs as the current user (the hub
says so at start-up): fine for a laptop demo, not for shared use.

What a user may start comes from the policy: the profile (``user_options["profile"]``, the
KubeSpawner convention) must be one of the user's entitled profiles, else the spawn is
refused with 403 before anything starts.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from tornado import web
from traitlets import Bool, Dict, Unicode

from .policy import Policy, load_policy
from .starters import install_starters
from .sysusers import ensure_system_user, system_username

_POLICIES: dict[str, Policy] = {}


def cached_policy(path: str) -> Policy:
    """The policy at ``path``, loaded once per process."""
    if path not in _POLICIES:
        _POLICIES[path] = load_policy(path)
    return _POLICIES[path]


def choose_profile(policy: Policy, user_groups: list[str], requested: str | None) -> str:
    """The profile to start for a user, or raise ``web.HTTPError(403)`` (pure)."""
    allowed = policy.profiles_for(user_groups)
    if not allowed:
        raise web.HTTPError(
            403,
            "You are not in any group that may start a server (your groups: %s). "
            "Ask the platform team to add you to a group." % (", ".join(user_groups) or "none"),
        )
    if not requested:
        return allowed[0]
    if requested not in allowed:
        raise web.HTTPError(
            403,
            f"Profile {requested!r} is not available to you; your groups may use: {', '.join(allowed)}",
        )
    return requested


def dask_environment(policy: Policy, user_groups: list[str], gateway_url: str, proxy_address: str) -> dict[str, str]:
    """Environment that makes ``dask_gateway.Gateway()`` work with no arguments (pure)."""
    env = {
        "DASK_GATEWAY__ADDRESS": gateway_url,
        "DASK_GATEWAY__PUBLIC_ADDRESS": gateway_url,
        "DASK_GATEWAY__PROXY_ADDRESS": proxy_address,
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
    }
    dask = policy.dask_policy_for(user_groups)
    if dask is not None:
        env["WORKBENCH_DASK_MAX_WORKERS"] = str(dask.max_workers)
    return env


class WorkbenchLocalSpawner(LocalProcessSpawner):
    """LocalProcessSpawner driven by the platform policy."""

    policy_path = Unicode(help="Path of the platform YAML.").tag(config=True)

    system_users = Bool(
        False,
        help="""Run each user's server as their own Unix account (created on first spawn).
        Needs root. When False, servers run as the hub's user with homes under `homes_root`.""",
    ).tag(config=True)

    user_prefix = Unicode("wb-", help="Prefix of the Unix accounts made for hub users.").tag(config=True)

    homes_root = Unicode(
        help="Where homes live when `system_users` is False (one folder per hub user).",
    ).tag(config=True)

    dask_env = Dict(help="Gateway address settings added to every server's environment.").tag(config=True)

    # -- policy ----------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return cached_policy(self.policy_path)

    @property
    def user_groups(self) -> list[str]:
        return [g.name for g in self.user.groups]

    @property
    def system_user(self) -> str:
        return system_username(self.user.name, self.user_prefix)

    @property
    def home(self) -> str:
        if self.system_users:
            return pwd.getpwnam(self.system_user).pw_dir
        return os.path.join(self.homes_root, self.user.name)

    # -- LocalProcessSpawner hooks ---------------------------------------------

    def make_preexec_fn(self, name):
        if self.system_users:
            return set_user_setuid(self.system_user)
        home = self.home

        def preexec():
            os.chdir(home)

        return preexec

    def user_env(self, env):
        env["HOME"] = self.home
        env["SHELL"] = "/bin/bash"
        env["USER"] = self.system_user if self.system_users else pwd.getpwuid(os.getuid()).pw_name
        return env

    async def move_certs(self, paths):  # internal_ssl is off in the embedded mode
        return paths

    def get_env(self):
        env = super().get_env()
        env.update(dask_environment(self.policy, self.user_groups, **self.dask_env) if self.dask_env else {})
        profile = self.policy.profiles[self.profile_name]
        env.update(profile.env)
        env["WORKBENCH_PROFILE"] = self.profile_name
        return env

    async def start(self):
        self.profile_name = choose_profile(self.policy, self.user_groups, self.user_options.get("profile"))
        kinds = self.policy.kinds_of(self.user_groups)
        if self.system_users:
            entry = ensure_system_user(self.system_user, comment=f"Workbench user {self.user.name}")
            install_starters(entry.pw_dir, kinds, entry.pw_uid, entry.pw_gid)
        else:
            Path(self.home).mkdir(parents=True, exist_ok=True)
            install_starters(self.home, kinds)
        self.log.info(
            "Starting %s's server with profile %s as %s",
            self.user.name,
            self.profile_name,
            self.system_user if self.system_users else "the hub's own user",
        )
        return await super().start()
