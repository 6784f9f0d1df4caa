"""The Workbench cockpit's server side: one endpoint that gathers what the JupyterLab side panel shows.

::

    GET    <base_url>workbench/cockpit                       everything below, in one JSON document
    POST   <base_url>workbench/cockpit/clusters              {"options": {...}}: a new Dask cluster
    POST   <base_url>workbench/cockpit/clusters/<name>/scale {"count": n}
    DELETE <base_url>workbench/cockpit/clusters/<name>

The document (each part is computed independently; a service that is absent, down or answers nonsense
becomes one entry of ``problems`` and its part says ``"available": false``, the rest is still served):

- ``server``: the profile and where the server runs (engine, node, GPUs), its session end and idle limits,
  from the environment the spawner set (:mod:`workbench.serverinfo`);
- ``budgets``: per group of the user, each budget (GPU-/CPU-hours, the group's and the user's own share
  where ``per_user`` applies) as the quota service's ``GET api/usage/users/<name>`` answers it, with the
  level the policy's ``warn_at`` gives (``ok`` / ``warning`` / ``critical``);
- ``gpus``: utilisation and memory of this server's devices (``CUDA_VISIBLE_DEVICES``), read through
  :mod:`workbench.gpu_utilisation` (NVML, or a file for pretend devices and tests);
- ``dask``: the user's clusters from the gateway (``api/v1/clusters/``), with workers, cores and memory
  read from each running cluster's scheduler (``json/identity.json`` through the dashboard guard), and the
  options the gateway allows this user (``api/v1/options``);
- ``notifications``: the merged quota and sessions notifications (:mod:`workbench.lab.notifications`).

Everything is asked with the server's own ``$JUPYTERHUB_API_TOKEN``, which belongs to the server's owner:
the gateway answers with that user's clusters only, the quota service with that user's usage only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from jupyter_server.base.handlers import APIHandler
from tornado import httpclient, web
from traitlets import Float, Unicode, default
from traitlets.config import LoggingConfigurable

from workbench.gpu_utilisation import FileUtilisation, GpuUtilisation, NvmlUtilisation
from workbench.lab.notifications import WorkbenchNotifications, services_base_url
from workbench.names import GATEWAY_SERVICE, QUOTA_SERVICE
from workbench.serverinfo import ENGINE_VAR, INFO_VAR

ENDPOINT = "workbench/cockpit"
#: a cluster name as dask-gateway makes them (never a path)
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NO_GPU = "No GPU in this session: this profile has none."


def budget_level(fraction: float, exhausted: bool, warn_at: list[float]) -> str:
    """``critical`` when spent or past the highest warning level, ``warning`` past the first, else ``ok`` (pure)."""
    levels = sorted(warn_at or [0.8, 0.95])
    if exhausted or fraction >= 1 or (len(levels) > 1 and fraction >= levels[-1]):
        return "critical"
    if fraction >= levels[0]:
        return "warning" if len(levels) > 1 else "critical"
    return "ok"


def budgets_view(usage: Mapping, warn_at: Mapping[str, list[float]]) -> list[dict]:
    """The quota service's user usage document as the panel's groups of budgets (pure)."""
    groups: dict[str, dict] = {}
    for b in usage.get("budgets") or []:
        if not isinstance(b, Mapping) or not b.get("group"):
            continue
        g = groups.setdefault(
            b["group"], {"group": b["group"], "warn_at": list(warn_at.get(b["group"], [])), "budgets": []}
        )
        fraction = float(b.get("fraction") or 0.0)
        groups[b["group"]]["budgets"].append(
            {
                "resource": b.get("resource"),
                "scope": b.get("scope"),
                "used_hours": b.get("used_hours"),
                "limit_hours": b.get("limit_hours"),
                "fraction": fraction,
                "exhausted": bool(b.get("exhausted")),
                "resets_at": b.get("resets_at"),
                "period": (b.get("period") or {}).get("name")
                if isinstance(b.get("period"), Mapping)
                else b.get("period"),
                "level": budget_level(fraction, bool(b.get("exhausted")), g["warn_at"]),
            }
        )
    for g in groups.values():
        g["budgets"].sort(key=lambda b: (b["resource"] != "gpu", b["scope"] != "group"))
    return sorted(groups.values(), key=lambda g: g["group"])


def server_view(env: Mapping[str, str], now: datetime) -> dict:
    """Where this server runs and what applies to it, from the spawner's environment (pure)."""
    try:
        info = json.loads(env.get(INFO_VAR) or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in (visible or "").split(",") if d.strip()]
    session = dict(info.get("session") or {})
    ends_at = session.get("ends_at")
    if ends_at:
        try:
            end = datetime.fromisoformat(ends_at.replace("Z", "+00:00"))
            session["seconds_left"] = max(0, int((end - now).total_seconds()))
        except ValueError:
            session["seconds_left"] = None
    return {
        "user": env.get("JUPYTERHUB_USER", ""),
        "profile": info.get("profile") or env.get("WORKBENCH_PROFILE", ""),
        "display_name": info.get("display_name") or env.get("WORKBENCH_PROFILE", ""),
        "engine": info.get("engine") or env.get(ENGINE_VAR, ""),
        "node": env.get("WORKBENCH_NODE") or socket.gethostname(),
        "cpu": info.get("cpu") or _float(env.get("CPU_LIMIT")),
        "memory": info.get("memory") or _float(env.get("MEM_LIMIT")),
        "limits": env.get("WORKBENCH_LIMITS", ""),
        "gpu": info.get("gpu"),
        "gpu_devices": devices,
        "groups": info.get("groups") or [],
        "charged_group": info.get("charged_group"),
        "session": session,
        "warn_at": info.get("warn_at") or {},
    }


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v else None
    except ValueError:
        return None


def hub_prefix(env: Mapping[str, str]) -> str:
    """The hub's base URL as the browser sees it (pure): a path, or with the hub's origin when the hub says it.

    With subdomains (``JupyterHub.subdomain_host``) this server is on its own origin, and the hub's services
    (the dashboard guard) are on the hub's: ``$JUPYTERHUB_PUBLIC_HUB_URL`` gives it (``http://localhost:8000/hub/``).
    """
    base = "/" + (env.get("JUPYTERHUB_BASE_URL") or "/").strip("/")
    hub = urlsplit((env.get("JUPYTERHUB_PUBLIC_HUB_URL") or "").strip())
    return f"{hub.scheme}://{hub.netloc}{base}" if hub.scheme and hub.netloc else base


def cluster_view(model: Mapping, identity: Mapping | None, now: float, public_prefix: str = "/") -> dict:
    """One cluster of the gateway's list, with its workers from the scheduler's identity when known (pure).

    ``public_prefix``: the hub's base URL as the browser sees it; the dashboard link goes through the
    dashboard guard at ``<prefix>services/dask-gateway/clusters/<name>/status`` (owner only).
    """
    route = model.get("dashboard_route")
    workers = (identity or {}).get("workers") if isinstance(identity, Mapping) else None
    out = {
        "name": model.get("name"),
        "status": model.get("status"),
        "options": {k: v for k, v in (model.get("options") or {}).items() if k != "environment"},
        "age_seconds": max(0, int(now - model["start_time"] / 1000)) if model.get("start_time") else None,
        "dashboard": route,
        "dashboard_url": f"{public_prefix.rstrip('/')}/services/{GATEWAY_SERVICE}{route}" if route else None,
        "workers": None,
        "cores": None,
        "memory": None,
    }
    if isinstance(workers, Mapping):
        out["workers"] = len(workers)
        out["cores"] = sum(int(w.get("nthreads") or 0) for w in workers.values() if isinstance(w, Mapping))
        out["memory"] = sum(int(w.get("memory_limit") or 0) for w in workers.values() if isinstance(w, Mapping))
    return out


def options_view(spec: object) -> list[dict]:
    """The gateway's option specification as form fields with their limits (pure); ``environment`` is left out."""
    fields = (spec or {}).get("cluster_options") if isinstance(spec, Mapping) else None
    out = []
    for f in fields or []:
        if not isinstance(f, Mapping) or f.get("field") == "environment":
            continue
        spec_ = f.get("spec") or {}
        out.append(
            {
                "field": f.get("field"),
                "label": f.get("label") or f.get("field"),
                "type": spec_.get("type"),
                "default": f.get("default", spec_.get("default")),
                "min": spec_.get("min"),
                "max": spec_.get("max"),
                "options": spec_.get("options"),
            }
        )
    return out


class GatewayError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class WorkbenchCockpit(LoggingConfigurable):
    """Gathers the cockpit's document (configure as ``c.WorkbenchCockpit``)."""

    timeout = Float(5.0, help="Seconds to wait for each service before reporting it as a problem.").tag(config=True)
    token = Unicode(help="Hub token sent to the services (default: $JUPYTERHUB_API_TOKEN).").tag(config=True)
    gpu_utilisation_file = Unicode(
        help="""A JSON file {device: percent or {utilisation, memory_used, memory_total}} to read GPU figures from
        instead of NVML (pretend GPUs, tests). Default: $WORKBENCH_GPU_UTILISATION_FILE.""",
    ).tag(config=True)

    def __init__(self, notifier: WorkbenchNotifications, **kw):
        super().__init__(**kw)
        self.notifier = notifier
        self._gpu_source: GpuUtilisation | None = None
        self._gpu_problem = ""

    @default("token")
    def _token_default(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("gpu_utilisation_file")
    def _file_default(self):
        return os.environ.get("WORKBENCH_GPU_UTILISATION_FILE", "")

    def base_url(self) -> str:
        return self.notifier.base_url() or services_base_url(os.environ)

    async def _fetch(self, url: str, method: str = "GET", body: object = None, scheme: str = "token"):
        client = httpclient.AsyncHTTPClient()
        headers = {"Authorization": f"{scheme} {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return await client.fetch(
            url,
            method=method,
            headers=headers,
            body=None if body is None else json.dumps(body),
            connect_timeout=self.timeout,
            request_timeout=self.timeout if method == "GET" else max(self.timeout, 60.0),
            follow_redirects=False,
            raise_error=False,
            allow_nonstandard_methods=True,
        )

    async def _json(self, url: str, scheme: str = "token") -> object:
        try:
            r = await self._fetch(url, scheme=scheme)
        except (OSError, httpclient.HTTPError) as e:
            raise GatewayError(599, f"not reachable: {e}") from None
        if r.code == 599:
            raise GatewayError(599, f"not reachable: {r.error}")
        if r.code in (302, 404) and "/services/" in url:  # the hub's answer for a service it does not have
            raise GatewayError(r.code, f"absent: this workbench does not run it (the hub answered {r.code})")
        if r.code != 200:
            raise GatewayError(r.code, f"answered {r.code}: {_reason(r)}")
        try:
            return json.loads(r.body or b"")
        except ValueError:
            raise GatewayError(r.code, "answered something that is not JSON") from None

    # -- the parts ----------------------------------------------------------------

    async def budgets(self, user: str, warn_at: Mapping) -> dict:
        base = self.base_url()
        if not base:
            raise GatewayError(0, "the hub's services URL is unknown (set WORKBENCH_SERVICES_URL)")
        doc = await self._json(f"{base}{QUOTA_SERVICE}/api/usage/users/{quote(user, safe='')}")
        if not isinstance(doc, Mapping):
            raise GatewayError(200, "answered JSON that is not a usage document")
        return {"available": True, "period": doc.get("period"), "groups": budgets_view(doc, warn_at)}

    def _gpu_reader(self) -> GpuUtilisation | None:
        if self._gpu_source is None and not self._gpu_problem:
            if self.gpu_utilisation_file:
                self._gpu_source = FileUtilisation(self.gpu_utilisation_file)
            else:
                try:
                    self._gpu_source = NvmlUtilisation()
                except ImportError:
                    self._gpu_problem = "nvidia-ml-py is not installed in this image: GPU figures are unknown"
                except Exception as e:  # NVMLError: no driver
                    self._gpu_problem = f"NVML did not start ({e}): GPU figures are unknown"
        return self._gpu_source

    def gpus(self, server: Mapping) -> dict:
        devices = list(server.get("gpu_devices") or [])
        if not server.get("gpu") or not devices:
            return {"available": True, "devices": [], "message": NO_GPU}
        reader = self._gpu_reader()
        if reader is None:
            return {"available": False, "devices": [{"id": d} for d in devices], "message": self._gpu_problem}
        util = reader.utilisation(devices)
        memory_of = getattr(reader, "memory", None)
        memory = memory_of(devices) if memory_of else {}
        out = []
        for d in devices:
            used, total = memory.get(d, (None, None))
            out.append({"id": d, "utilisation": util.get(d), "memory_used": used, "memory_total": total})
        message = "" if util else "The GPUs' figures cannot be read (a MIG slice reports none)."
        return {"available": True, "devices": out, "message": message}

    def _gateway(self) -> str:
        base = self.base_url()
        if not base:
            raise GatewayError(0, "the hub's services URL is unknown (set WORKBENCH_SERVICES_URL)")
        return f"{base}{GATEWAY_SERVICE}/"

    async def dask(self) -> dict:
        gw = self._gateway()
        clusters, options = await asyncio.gather(
            self._json(f"{gw}api/v1/clusters/", scheme="jupyterhub"),
            self._json(f"{gw}api/v1/options", scheme="jupyterhub"),
        )
        if not isinstance(clusters, Mapping):
            raise GatewayError(200, "answered a cluster list that is not an object")
        models = [m for m in clusters.values() if isinstance(m, Mapping)]

        async def identity(m: Mapping) -> Mapping | None:
            if m.get("status") != "RUNNING" or not m.get("dashboard_route"):
                return None
            try:
                doc = await self._json(
                    f"{gw}clusters/{quote(str(m['name']), safe='')}/json/identity.json", "jupyterhub"
                )
            except GatewayError as e:
                self.log.debug("cockpit: no identity of cluster %s: %s", m.get("name"), e)
                return None
            return doc if isinstance(doc, Mapping) else None

        identities = await asyncio.gather(*(identity(m) for m in models))
        now = time.time()
        prefix = hub_prefix(os.environ)
        views = [cluster_view(m, i, now, prefix) for m, i in zip(models, identities, strict=True)]
        views.sort(key=lambda c: str(c["name"]))
        return {"available": True, "clusters": views, "options": options_view(options)}

    async def document(self) -> dict:
        now = datetime.now(UTC)
        server = server_view(os.environ, now)
        problems: list[dict] = []

        async def part(source: str, coro, absent: dict) -> dict:
            if not self.token:
                problems.append(
                    {"source": source, "message": "no hub token: this server does not run under JupyterHub"}
                )
                return {"available": False, **absent}
            try:
                return await coro
            except GatewayError as e:
                self.log.warning("workbench cockpit: %s %s", source, e.message)
                problems.append({"source": source, "message": e.message})
                return {"available": False, **absent}

        budgets, dask, notes = await asyncio.gather(
            part(QUOTA_SERVICE, self.budgets(server["user"], server["warn_at"]), {"groups": []}),
            part(GATEWAY_SERVICE, self.dask(), {"clusters": [], "options": []}),
            self.notifier.get(),
        )
        return {
            "as_of": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "server": server,
            "budgets": budgets,
            "gpus": self.gpus(server),
            "dask": dask,
            "notifications": notes["notifications"],
            "problems": problems + [p for p in notes["problems"] if p["source"] not in {q["source"] for q in problems}],
        }

    # -- actions on clusters (the gateway decides what this user may do) -----------------

    async def gateway_call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        try:
            r = await self._fetch(self._gateway() + path, method=method, body=body, scheme="jupyterhub")
        except (OSError, httpclient.HTTPError) as e:
            raise GatewayError(502, f"the Dask Gateway is not reachable: {e}") from None
        if r.code == 599:
            raise GatewayError(502, f"the Dask Gateway is not reachable: {r.error}")
        if 300 <= r.code < 400:  # the hub redirects for a service it does not have
            raise GatewayError(502, f"the Dask Gateway is absent from this workbench (the hub answered {r.code})")
        if r.code >= 400:
            raise GatewayError(r.code, _reason(r))
        try:
            return r.code, json.loads(r.body) if r.body else {}
        except ValueError:
            return r.code, {}


def _reason(r: httpclient.HTTPResponse) -> str:
    text = (r.body or b"").decode(errors="replace").strip()
    try:
        doc = json.loads(text)
        text = doc.get("message") or doc.get("error") or doc.get("reason") or text
    except (ValueError, AttributeError):
        pass
    return (text or r.reason or "")[:300]


class _Base(APIHandler):
    def initialize(self, cockpit: WorkbenchCockpit):
        self.cockpit = cockpit

    def fail(self, e: GatewayError):
        self.set_status(e.code if 400 <= e.code < 600 and e.code != 599 else 502)
        self.finish(json.dumps({"message": e.message}))

    def body(self) -> dict:
        try:
            doc = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return doc


def _cluster(name: str) -> str:
    if not CLUSTER_NAME.match(name) or set(name) == {"."}:
        raise web.HTTPError(400, f"{name!r} is not a cluster name")
    return quote(name, safe="")


class CockpitHandler(_Base):
    """``GET <base_url>workbench/cockpit``."""

    @web.authenticated
    async def get(self):
        doc = await self.cockpit.document()
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(doc))


class ClustersHandler(_Base):
    """``POST <base_url>workbench/cockpit/clusters`` ``{"options": {...}}``: a new cluster of the user."""

    @web.authenticated
    async def post(self):
        options = self.body().get("options") or {}
        if not isinstance(options, dict):
            raise web.HTTPError(400, "'options' must be an object of cluster options")
        try:
            code, doc = await self.cockpit.gateway_call("POST", "api/v1/clusters/", {"cluster_options": options})
        except GatewayError as e:
            return self.fail(e)
        self.set_status(code)
        self.finish(json.dumps(doc))


class ClusterHandler(_Base):
    """``DELETE <base_url>workbench/cockpit/clusters/<name>``: stop one of the user's clusters."""

    @web.authenticated
    async def delete(self, name: str):
        try:
            await self.cockpit.gateway_call("DELETE", f"api/v1/clusters/{_cluster(name)}")
        except GatewayError as e:
            return self.fail(e)
        self.set_status(204)
        self.finish()


class ScaleHandler(_Base):
    """``POST <base_url>workbench/cockpit/clusters/<name>/scale`` ``{"count": n}``."""

    @web.authenticated
    async def post(self, name: str):
        count = self.body().get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise web.HTTPError(400, f"'count' must be a whole number of workers (0 or more), got {count!r}")
        try:
            _, doc = await self.cockpit.gateway_call(
                "POST", f"api/v1/clusters/{_cluster(name)}/scale", {"count": count}
            )
        except GatewayError as e:
            return self.fail(e)
        self.finish(json.dumps(doc or {}))


def handlers(base_url: str, cockpit: WorkbenchCockpit) -> list[tuple]:
    from jupyter_server.utils import url_path_join

    root = url_path_join(base_url, ENDPOINT)
    kw = {"cockpit": cockpit}
    return [
        (root, CockpitHandler, kw),
        (url_path_join(root, "clusters"), ClustersHandler, kw),
        (url_path_join(root, "clusters", r"([^/]+)"), ClusterHandler, kw),
        (url_path_join(root, "clusters", r"([^/]+)", "scale"), ScaleHandler, kw),
    ]
