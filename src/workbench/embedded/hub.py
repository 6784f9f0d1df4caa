"""JupyterHub configuration of the embedded workbench, built from (policy, runtime) by pure functions.

``hub_settings`` returns ``{section: {trait: value}}`` with no I/O, so it can be unit-tested
against literal dicts; ``configure_hub`` reads the runtime, policy and secrets and applies it to
the traitlets config object of ``hub_config/jupyterhub_config.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workbench.auth.demo import DemoAuthExposed, check_demo_exposure
from workbench.auth.oauth import auth_settings
from workbench.jobs.wiring import add_jobs_service
from workbench.names import (
    GATEWAY_SERVER_SERVICE,
    GATEWAY_SERVICE,
    ROSTERS_ACCESS_SCOPE,
    ROSTERS_SERVICE,
    SERVER_TOKEN_SCOPES,
    SESSIONS_ACCESS_SCOPE,
    SESSIONS_SERVICE,
)
from workbench.origins import loopback_redirect_settings, merge_settings, subdomain_settings
from workbench.policy import Policy, PolicyError, load_policy
from workbench.runtime import Runtime, free_port, load_or_create_secrets
from workbench.services.quota.wiring import add_quota_service, pass_db_url
from workbench.services.rosters.rules import needs_service as needs_rosters_service
from workbench.services.sessions.rules import needs_service as needs_sessions_service
from workbench.settings import apply_settings, roles
from workbench.spawn.concurrency import StartSlotsError, hub_start_timeout, start_slots_from_env
from workbench.spawn.local import WorkbenchLocalSpawner
from workbench.spawnpage import TEMPLATES as SPAWN_TEMPLATES
from workbench.spawnpage import spawn_form
from workbench.spawnpage import template_vars as spawn_template_vars

# seconds a start may wait for a start slot: the line always moves (each holder answers or fails within
# SLOT_START_TIMEOUT), so this only caps a very long line (a class of 40 on a 2-core machine loaded by other work
# needed more than the 900 s this was: benchmarks/README.md, class start)
START_QUEUE_TIMEOUT = 3600.0
# starts pending at once before the hub answers 429: the start slots queue them instead (a class logs in together)
CONCURRENT_SPAWN_LIMIT = 1000
# seconds from the slot until the server answers: one JupyterLab start-up takes 5-10 s alone, but past 100 s in a
# 1-core cgroup on a 2-core machine at load 25 (the first N=40 class start lost 21 of 40 to the 120 s this was)
SLOT_START_TIMEOUT = 300.0


def _cls(klass: type) -> str:
    return f"{klass.__module__}.{klass.__name__}"


#: seconds the hub waits for each managed service to answer at start-up (upstream's default is 30). The hub exits
#: when one does not answer in time, and the six start at once: on a loaded 2-core machine the dashboard guard
#: answered 502 for more than 30 s while dask-gateway-server behind it was still importing (a CI run's hub exited
#: with "Cannot connect to dask-gateway service"). A slow start is not a failed one: a service that exits still
#: fails the start-up at once (workbench.hubapp).
MANAGED_SERVICE_TIMEOUT = 120


def services(policy: Policy, runtime: Runtime, secrets: dict[str, str]) -> list[dict]:
    """Hub-managed services: the Dask Gateway (guard + server), the sessions and roster services.

    ``dask-gateway`` (the name users' scopes and ``/services/dask-gateway`` depend on) is
    :mod:`workbench.gateway.dashguard`, which forwards to dask-gateway-server's HTTP proxy and shows a
    cluster's dashboard to its owner only (logging browsers in with the hub's OAuth, with no
    consent page); dask-gateway-server itself is ``dask-gateway-server``, with no URL.

    ``sessions`` (:mod:`workbench.services.sessions.app`, instead of jupyterhub-idle-culler: per-profile idle
    limits, idle GPUs, session limits with warnings) runs when culling is enabled or a group or
    profile has ``session.max_age``; it checks every ``culling.every`` and serves users their
    notifications at ``/services/sessions/api/notifications``. Its port is ``runtime.sessions_port``
    (``workbench up`` picks it), else a free port picked here (the only I/O of this function).

    ``rosters`` (:mod:`workbench.services.rosters.app`: course rosters loaded by instructors and admins at
    ``/services/rosters/api/courses/<course>/students``) runs when the policy has a course, on
    ``runtime.rosters_port`` or, likewise, a free port.
    """
    venv = Path(runtime.venv_bin)
    env = {"WORKBENCH_RUNTIME": str(Path(runtime.state_dir, "runtime.json"))}
    # the hub starts services in this order and waits for each one with a URL to answer
    # (< 500): the guard answers for the gateway, so the gateway starts first
    out = [
        {
            "name": GATEWAY_SERVER_SERVICE,
            "command": [
                str(venv / "dask-gateway-server"),
                "-f",
                str(Path(runtime.hub_config_dir, "dask_gateway_config.py")),
            ],
            "cwd": runtime.state_dir,
            "environment": dict(env),
        },
        {
            "name": GATEWAY_SERVICE,
            "url": f"http://127.0.0.1:{runtime.gateway_guard_port}",
            "api_token": secrets["gateway_api_token"],
            "oauth_no_confirm": True,
            "command": [str(venv / "python"), "-m", "workbench.gateway.dashguard"],
            "cwd": runtime.state_dir,
            "environment": dict(env),
        },
    ]

    def python_service(name: str, port: int, token: str, *command: str) -> dict:
        """A service of ours on 127.0.0.1 (``port`` 0: a free one), run as ``python -m <command>``."""
        return {
            "name": name,
            "url": f"http://127.0.0.1:{port or free_port()}",
            "api_token": secrets[token],
            "command": [str(venv / "python"), "-m", *command],
            "cwd": runtime.state_dir,
            "environment": dict(env),
        }

    if needs_sessions_service(policy):
        out.append(
            python_service(
                SESSIONS_SERVICE,
                runtime.sessions_port,
                "sessions_api_token",
                "workbench.services.sessions",
                f"--interval={policy.culling.every}",
            )
        )
    if needs_rosters_service(policy):
        out.append(
            python_service(ROSTERS_SERVICE, runtime.rosters_port, "rosters_api_token", "workbench.services.rosters")
        )
    return out


def hub_settings(policy: Policy, runtime: Runtime, secrets: dict[str, str]) -> dict[str, dict]:
    """All hub settings for the embedded mode (pure)."""
    check_demo_exposure(policy.auth.type, runtime.bind, runtime.allow_demo_auth_on_network)
    auth = auth_settings(policy, runtime)  # authenticator_class, login page text and the authenticator's sections
    state = Path(runtime.state_dir)
    venv = Path(runtime.venv_bin)
    settings = {
        "JupyterHub": {
            "bind_url": f"http://{f'[{runtime.bind}]' if ':' in runtime.bind else runtime.bind}:{runtime.port}",
            "hub_bind_url": f"http://127.0.0.1:{runtime.hub_port}",
            "db_url": f"sqlite:///{state / 'jupyterhub.sqlite'}",
            "cookie_secret": bytes.fromhex(secrets["cookie_secret"]),
            "pid_file": str(state / "jupyterhub.pid"),
            "spawner_class": _cls(WorkbenchLocalSpawner),
            "services": services(policy, runtime, secrets),
            "load_roles": roles(policy),
            "cleanup_servers": True,
            "cleanup_proxy": True,
            # the start slots (workbench.spawn.concurrency) queue what the machine cannot start at once, with places
            # on the spawn page; JupyterHub's default 100 would answer 429 to the rest of a large class instead
            "concurrent_spawn_limit": CONCURRENT_SPAWN_LIMIT,
            # the platform's own pages (branding) and spawn form, JupyterHub's templates extended (workbench.spawnpage)
            "template_paths": [str(SPAWN_TEMPLATES)],
            **auth["JupyterHub"],
            "template_vars": {**auth["JupyterHub"].get("template_vars", {}), **spawn_template_vars(policy)},
        },
        # the state folder is local: the hub's commits without an fsync each (workbench.hubapp)
        "WorkbenchHub": {"sqlite_wal": True},
        "ConfigurableHTTPProxy": {
            "command": [runtime.proxy_command],
            "api_url": f"http://127.0.0.1:{runtime.proxy_api_port}",
            "auth_token": secrets["proxy_auth_token"],
            "pid_file": str(state / "proxy.pid"),
            "should_start": True,
        },
        **{section: values for section, values in auth.items() if section != "JupyterHub"},
        "Spawner": {
            "cmd": [str(venv / "jupyterhub-singleuser")],
            "default_url": "/lab",
            # notebooks may also read their user's session notifications (workbench.services.sessions.app), and an
            # instructor's notebook may load rosters (JupyterHub gives a token only the scopes its owner holds)
            "server_token_scopes": list(SERVER_TOKEN_SCOPES)
            + ([SESSIONS_ACCESS_SCOPE] if needs_sessions_service(policy) else [])
            + ([ROSTERS_ACCESS_SCOPE] if needs_rosters_service(policy) else []),
            # a start waits for its slot (workbench.spawn.concurrency), then has slot_start_timeout to answer: the
            # hub's own timer covers both, so that a queued start is not killed by it
            "start_timeout": hub_start_timeout(START_QUEUE_TIMEOUT, SLOT_START_TIMEOUT),
            "http_timeout": 90,
            "poll_interval": 10,  # servers only: a crashed managed service is noticed by JupyterHub's 30 s service check
        },
        "WorkbenchLocalSpawner": {
            "start_queue_timeout": START_QUEUE_TIMEOUT,
            "slot_start_timeout": SLOT_START_TIMEOUT,
            "policy_path": runtime.config,
            "system_users": runtime.system_users,
            "user_prefix": runtime.user_prefix,
            "homes_root": str(state / "homes"),
            "gpus": runtime.gpus,
            "options_form": spawn_form,  # each profile: can it start now, its cost against the budget, its limit
            "gateway_api_url": f"http://127.0.0.1:{runtime.gateway_http_port}/services/{GATEWAY_SERVICE}/api/v1",
            "dask_env": {
                "gateway_url": runtime.gateway_public_url,
                "proxy_address": runtime.gateway_proxy_address,
            },
            "env_keep": ["PATH", "LANG", "LC_ALL"],
            "environment": {"PATH": f"{venv}:/usr/local/bin:/usr/bin:/bin"},
        },
    }
    # the quota service, its roles and scopes (workbench.services.quota.wiring; only when runtime.quota_port is set)
    add_jobs_service(settings, policy, runtime, secrets)  # notebook jobs (workbench.jobs.wiring)
    settings = add_quota_service(settings, policy, runtime, secrets)
    for service in settings["JupyterHub"].get("services", []):
        if service.get("command") and service.get("url"):  # a managed service the hub waits for at start-up
            service.setdefault("timeout", MANAGED_SERVICE_TIMEOUT)
    if runtime.extra.get("subdomain_host"):  # `workbench up --subdomains`: each server on its own origin
        add_subdomains(settings, runtime)
    if runtime.extra.get("spawner") == "slurm":  # supercomputer mode: servers as Slurm jobs (workbench.spawn.slurm)
        from workbench.gateway.slurm import resolve_slurm_conf
        from workbench.spawn.slurm import WorkbenchSlurmSpawner, slurm_spawner_settings

        settings["JupyterHub"]["spawner_class"] = _cls(WorkbenchSlurmSpawner)
        settings["WorkbenchSlurmSpawner"] = slurm_spawner_settings(
            settings["WorkbenchLocalSpawner"], runtime.venv_bin, resolve_slurm_conf(runtime)
        )
    return settings


def add_subdomains(settings: dict[str, dict], runtime: Runtime) -> None:
    """Serve each user's server from its own origin, ``http://<user>.localhost:<port>/user/<user>/`` (in place).

    The hub and its services stay at ``runtime.extra["subdomain_host"]`` (``http://localhost:<port>``:
    browsers resolve every ``*.localhost`` to loopback by themselves) and, for the platform's own
    processes (glibc resolves no ``*.localhost``), at ``runtime.public_url`` too (``127.0.0.1``: extra proxy
    routes, see :mod:`workbench.origins`), where a browser's page is redirected to the hub's origin. Notebooks
    reach the services at the latter
    (``WORKBENCH_SERVICES_URL``); Dask Gateway at the hub's origin, so dashboard links open where the
    guard's login cookie lives.
    """
    host = runtime.extra["subdomain_host"]
    merge_settings(settings, subdomain_settings(host, settings["JupyterHub"]["services"], [runtime.connect_host]))
    redirect = loopback_redirect_settings(host, [runtime.connect_host], settings["JupyterHub"]["hub_bind_url"])
    settings["ConfigurableHTTPProxy"]["extra_routes"].update(redirect["ConfigurableHTTPProxy"]["extra_routes"])
    settings["JupyterHub"]["extra_handlers"] = redirect["JupyterHub"]["extra_handlers"]
    spawner = settings["WorkbenchLocalSpawner"]
    spawner["environment"] = {**spawner["environment"], "WORKBENCH_SERVICES_URL": f"{runtime.public_url}/services/"}
    spawner["dask_env"] = {**spawner["dask_env"], "gateway_url": f"{host}/services/{GATEWAY_SERVICE}"}


def configure_hub(c, runtime: Runtime | None = None, policy: Policy | None = None) -> None:
    """Configure the hub of the embedded workbench (reads runtime.json, the policy, secrets)."""
    runtime = runtime or Runtime.from_env()
    try:
        policy = policy or load_policy(runtime.config)
        settings = hub_settings(policy, runtime, load_or_create_secrets(runtime.state_dir))
        slots = start_slots_from_env(os.environ)  # $WORKBENCH_START_SLOTS (unset: from the machine)
    except (PolicyError, DemoAuthExposed, StartSlotsError) as e:  # make the hub's own log say what is wrong, then stop
        print(f"workbench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if slots is not None:
        settings["WorkbenchLocalSpawner"]["start_slots"] = slots
    pass_db_url(settings, os.environ)  # $WORKBENCH_QUOTA_DB_URL of the hub's environment to the quota service
    apply_settings(c, settings)
