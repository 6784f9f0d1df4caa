"""What every spawner needs, written once: the profile a user may start, the spawn form, the Dask environment of a
server, admission by the quota service before a server starts (:class:`QuotaAdmissionMixin`), a user's Dask
clusters stopping with their server (:class:`StopsDaskClustersMixin`), start options that become a default
only once admitted, and the scopes that open a course member's server to the course's instructors.

The engines (:mod:`workbench.spawn.local`, :mod:`workbench.spawn.kube`) are thin layers over these.
"""

from __future__ import annotations

import html
import json

from tornado import web
from traitlets import HasTraits, Unicode

from workbench.names import GATEWAY_ACCESS_SCOPE
from workbench.policy import Policy, Profile, cached_policy
from workbench.services.quota.client import QuotaClient, QuotaUnavailable
from workbench.services.quota.models import server_item_id
from workbench.services.quota.views import charge_group
from workbench.sysusers import USER_PREFIX, system_username


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


def describe_profile(policy: Policy, name: str) -> str:
    """One line saying what a profile gives: GPU, cores, memory, image (pure)."""
    p: Profile = policy.profiles[name]
    parts = []
    if p.gpu:
        gtype = policy.gpu_types[p.gpu.type]
        parts.append(f"{p.gpu.count}× {gtype.display_name or p.gpu.type}")
    parts.append(f"{p.cpu:g} CPU")
    parts.append(f"{(p.memory_limit or p.memory) / 1e9:g} GB")
    image = policy.images[p.image]
    parts.append(f"image: {image.display_name or image.image}")
    return " · ".join(parts)


def options_form_html(policy: Policy, user_groups: list[str]) -> str:
    """The spawn form: the user's entitled profiles, grouped by group and described (pure)."""
    seen: set[str] = set()
    sections = []
    first = True
    for gname in policy.groups_of(user_groups):
        group = policy.groups[gname]
        items = []
        for pname in policy.profiles_for([gname]):
            if pname in seen:
                continue
            seen.add(pname)
            prof = policy.profiles[pname]
            checked = " checked" if first else ""
            first = False
            items.append(
                f'<label class="wb-profile" style="display:block;margin:0.4em 0">'
                f'<input type="radio" name="profile" value="{html.escape(pname)}"{checked}> '
                f"<strong>{html.escape(prof.display_name or pname)}</strong> "
                f'<span class="text-muted">({html.escape(pname)})</span><br>'
                f"<small>{html.escape(describe_profile(policy, pname))}"
                f"{' — ' + html.escape(prof.description) if prof.description else ''}</small></label>"
            )
        if items:
            title = html.escape(group.display_name or gname)
            sections.append(f'<fieldset class="wb-group"><legend>{title}</legend>{"".join(items)}</fieldset>')
    return "\n".join(sections)


class PolicySpawnerMixin(HasTraits):
    """Who and what, for the spawners that run servers as the user's own Unix account (local and Slurm): the policy
    from ``policy_path``, the user's hub groups and the account ``wb-<name>`` (:func:`workbench.sysusers.system_username`).
    """

    policy_path = Unicode(help="Path of the platform YAML.").tag(config=True)

    user_prefix = Unicode(USER_PREFIX, help="Prefix of the Unix accounts made for hub users.").tag(config=True)

    @property
    def policy(self) -> Policy:
        return cached_policy(self.policy_path)

    @property
    def user_groups(self) -> list[str]:
        return [g.name for g in self.user.groups]

    @property
    def system_user(self) -> str:
        return system_username(self.user.name, self.user_prefix)


class StopsDaskClustersMixin(HasTraits):
    """A user's Dask clusters end with their default notebook server (dask-gateway#255, #393).

    Used by the local spawner and by :class:`workbench.spawn.kube.WorkbenchKubeSpawner`: after the server
    stops, the user's clusters are listed and stopped through the gateway's API, with a short-lived
    token of the user that carries only the gateway access scope. A gateway that does not answer
    is logged, never blocks the stop.
    """

    gateway_api_url = Unicode(
        "",
        help="The gateway's API (e.g. http://127.0.0.1:PORT/services/dask-gateway/api/v1); when set, a user's "
        "clusters are stopped when their server stops.",
    ).tag(config=True)

    def _owns_dask_clusters(self) -> bool:
        groups = [g.name for g in self.user.groups]
        return bool(self.gateway_api_url) and not self.name and self.policy.dask_group_for(groups) is not None

    async def _stop_dask_clusters(self) -> None:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        token = self.user.new_api_token(
            scopes=[GATEWAY_ACCESS_SCOPE], expires_in=120, note="workbench: stop Dask clusters with the server"
        )
        headers = {"Authorization": f"jupyterhub {token}"}
        client = AsyncHTTPClient()
        try:
            resp = await client.fetch(f"{self.gateway_api_url}/clusters/", headers=headers, request_timeout=20)
            clusters = list(json.loads(resp.body))  # {name: model}
            for name in clusters:
                await client.fetch(
                    f"{self.gateway_api_url}/clusters/{name}", method="DELETE", headers=headers, request_timeout=20
                )
            if clusters:
                self.log.info("Stopped %d Dask cluster(s) of %s with their server", len(clusters), self.user.name)
        except (HTTPClientError, OSError) as e:
            self.log.warning("Could not stop the Dask clusters of %s: %s", self.user.name, e)


def course_access_scopes(policy: Policy, user_groups: list[str]) -> list[str]:
    """``access:servers!group=<course>`` for each course group of the user (pure).

    Added to a server's ``oauth_access_scopes``: jupyterhub-singleuser does not resolve group filters
    of a token's scopes to its user, so without these an instructor's own token (role
    ``instructor-<course>``: ``access:servers!group=<course>``) is refused by their students' servers.
    Only course groups: no other group's scope opens anyone's server.
    """
    return [f"access:servers!group={g}" for g in policy.groups_of(user_groups) if policy.groups[g].kind == "course"]


class AdmittedOptionsMixin(HasTraits):
    """Start options become the user's default only once a start with them was admitted.

    JupyterHub stores a request's ``user_options`` before the spawn runs and reuses them for later
    starts without options, so a refused request (an unentitled profile, ``{"profile": {"$ne": 1}}``,
    a quota refusal) would otherwise become the user's default and make every later plain start fail.
    The engines call :meth:`start_profile` first thing in a start, :meth:`forget_refused_options` when
    the start fails and :meth:`remember_admitted_options` when it succeeded:

    - options that were admitted before (or stored before this spawner was made) but that the policy
      no longer entitles (a profile taken from the group) fall back to the group's default profile,
      with a warning in the hub's log;
    - any other unentitled request is refused with 403, and the stored options go back to the last
      admitted ones.

    :meth:`start_profile` also sets ``oauth_access_scopes`` (see :func:`course_access_scopes`), from the
    user's groups at this start.
    """

    _admitted_options: dict | None = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # made before JupyterHub writes this start's options: the stored ones are the last admitted
        orm = kwargs.get("orm_spawner")
        self._admitted_options = dict(getattr(orm, "user_options", None) or {})

    def start_profile(self) -> str:
        """The profile of this start, after the checks above; raises ``web.HTTPError(403)`` when refused."""
        groups = [g.name for g in self.user.groups]
        self.oauth_access_scopes = [
            f"access:servers!server={self.user.name}/{self.name}",
            f"access:servers!user={self.user.name}",
            *course_access_scopes(self.policy, groups),
        ]
        options = dict(self.user_options or {})
        requested = options.get("profile") or None
        allowed = self.policy.profiles_for(groups)
        if requested is not None and options == self._admitted_options and allowed and requested not in allowed:
            fallback = allowed[0]
            self.log.warning(
                "The stored start options of %s ask for profile %r, which their groups (%s) may no longer use; "
                "starting %s, the default of their groups",
                self.user.name,
                requested,
                ", ".join(groups) or "none",
                fallback,
            )
            self.user_options = {k: v for k, v in options.items() if k != "profile"}
            self.remember_admitted_options()
            return fallback
        return choose_profile(self.policy, groups, requested)

    def forget_refused_options(self) -> None:
        """Put the last admitted options back as the user's stored default (this start failed)."""
        orm = getattr(self, "orm_spawner", None)
        if orm is None or (getattr(orm, "user_options", None) or {}) == self._admitted_options:
            return
        self.log.info(
            "Start of %s refused or failed: their stored start options stay %s", self.user.name, self._admitted_options
        )
        orm.user_options = dict(self._admitted_options)
        self.db.commit()

    def remember_admitted_options(self) -> None:
        """This start's options are the user's default from now on."""
        self._admitted_options = dict(self.user_options or {})
        orm = getattr(self, "orm_spawner", None)
        if orm is not None and (orm.user_options or {}) != self._admitted_options:
            orm.user_options = dict(self._admitted_options)
            self.db.commit()


class QuotaAdmissionMixin(HasTraits):
    """Every server start admitted by the quota service first, every stop recorded (budgets and caps, every engine).

    Used by the local spawner and by :class:`workbench.spawn.kube.WorkbenchKubeSpawner`. The spawner has
    ``policy``, ``user_groups`` and ``profile_name`` (the profile being started, chosen with
    :func:`choose_profile`). With :attr:`quota_api_url` set, :meth:`_admit` runs before anything starts:
    ``POST /api/admit`` (budgets and caps checked and the start recorded in one transaction) charges the
    user's first group entitled to the profile; a refusal is a 403 with the service's message, a service
    that does not answer a 503 (budgets are enforced, not advisory). :meth:`_record_stop` sends the stop
    event (the service's reconcile closes the row if that fails).
    """

    quota_api_url = Unicode(
        "",
        help="The quota service's API (e.g. http://127.0.0.1:PORT/services/quota/api); when set, every start is "
        "admitted by it first (budgets and caps; refused with its message) and every stop is recorded.",
    ).tag(config=True)

    quota_api_token = Unicode("", help="A hub token with custom:workbench-quota:write.").tag(config=True)

    @property
    def quota(self) -> QuotaClient | None:
        return QuotaClient(self.quota_api_url, self.quota_api_token) if self.quota_api_url else None

    @property
    def quota_item(self) -> str:
        return server_item_id(self.user.name, self.name)

    async def _admit(self) -> None:
        """Ask the quota service (budgets, caps) before anything starts; 403 with its message if refused."""
        group = charge_group(self.policy, self.user_groups, self.profile_name)
        try:
            decision = await self.quota.admit(
                item=self.quota_item,
                kind="server",
                user=self.user.name,
                group=group,
                profile=self.profile_name,
            )
        except QuotaUnavailable as e:
            self.log.error("Refusing %s's start: %s", self.user.name, e)
            raise web.HTTPError(
                503, "The quota service does not answer, so no server can start now; try again in a minute."
            ) from None
        if not decision.allowed:
            self.log.info("Quota refused %s's start (%s): %s", self.user.name, decision.reason, decision.message)
            raise web.HTTPError(403, decision.message)

    async def _record_stop(self) -> None:
        """The stop event of this server (never raises: the service's reconcile closes the row otherwise)."""
        if self.quota is not None:
            await self.quota.stop(self.quota_item)
