"""GPU utilisation reported by a server itself, for servers whose GPUs the sessions service cannot read.

The sessions service samples GPUs through NVML on the hub's machine (:mod:`workbench.gpu_utilisation`), which
works for local servers only. A server that runs elsewhere (a Slurm job on a compute node,
:mod:`workbench.spawn.slurm`) runs this reporter next to it: ``python -m workbench.services.sessions.report``
reads the utilisation of the devices in ``$CUDA_VISIBLE_DEVICES`` with the same readers as the JupyterLab
cockpit (NVML, or the JSON file ``$WORKBENCH_GPU_UTILISATION_FILE`` for pretend GPUs and tests) and posts it
every ``--every`` seconds with the server's own token::

    POST <services URL>sessions/api/gpu-utilisation   (Authorization: token $JUPYTERHUB_API_TOKEN)
    {"server": "<server name, '' for the default one>", "utilisation": {"0": 3.0, "1": 0.0}}

:func:`parse_report` validates a report (pure; errors name the field and the fix) and :class:`Reports` keeps
the latest one per server of each user, for the service's checks (:meth:`Reports.apply`). A report can only
speak for its sender's own servers: the user comes from the token, never from the body. A device that is
not in a fresh report stays unknown, and an unknown device is never counted as idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from workbench.gpu_utilisation import FileUtilisation, GpuUtilisation, NvmlUtilisation
from workbench.names import SESSIONS_SERVICE

__all__ = ["MAX_DEVICES", "REPORT_PATH", "Report", "Reports", "main", "parse_report"]

log = logging.getLogger("workbench.services.sessions.report")

#: where reports go, under the service's prefix
REPORT_PATH = "api/gpu-utilisation"
#: the most devices one report may name
MAX_DEVICES = 64


@dataclass(frozen=True)
class Report:
    """One server's GPU utilisation at one moment, as its reporter sent it."""

    server: str
    utilisation: dict[str, float]


def parse_report(body: object) -> Report:
    """The report in a request body, or ValueError naming the field and the fix (pure)."""
    if not isinstance(body, Mapping):
        raise ValueError('the body must be a JSON object {"server": "", "utilisation": {"<device>": <percent>}}')
    unknown = sorted(set(body) - {"server", "utilisation"})
    if unknown:
        raise ValueError(f"unknown fields {unknown}: a report has only 'server' and 'utilisation'")
    server = body.get("server", "")
    if not isinstance(server, str) or len(server) > 255:
        raise ValueError(f"server: the server's name (a string, '' for the default server), got {server!r}")
    util = body.get("utilisation")
    if not isinstance(util, Mapping) or not util:
        raise ValueError("utilisation: an object {<device>: <percent 0-100>} with at least one device")
    if len(util) > MAX_DEVICES:
        raise ValueError(f"utilisation: at most {MAX_DEVICES} devices, got {len(util)}")
    out = {}
    for device, value in util.items():
        if not device or len(device) > 128:
            raise ValueError(f"utilisation: device names are 1-128 characters, got {device!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"utilisation.{device}: a percentage 0-100, got {value!r}")
        if not 0 <= value <= 100:
            raise ValueError(f"utilisation.{device}: a percentage 0-100, got {value!r}")
        out[str(device)] = float(value)
    return Report(server=server, utilisation=out)


class Reports:
    """The latest report of each (user, server); reports older than ``max_age`` seconds count as none."""

    def __init__(self, max_age: float):
        self.max_age = timedelta(seconds=max_age)
        self.latest: dict[tuple[str, str], tuple[datetime, Report]] = {}

    def add(self, user: str, report: Report, now: datetime, threshold: float) -> bool:
        """Keep ``report``; True when it is the server's first or its GPUs turned busy or idle (worth a log line)."""
        _, before = self.latest.get((user, report.server), (None, None))
        self.latest[(user, report.server)] = (now, report)

        def idle(r: Report) -> bool:
            return all(v < threshold for v in r.utilisation.values())

        return before is None or idle(before) != idle(report)

    def apply(self, servers: Iterable, samples: Mapping[str, float], now: datetime) -> tuple[list, dict[str, float]]:
        """Servers (``rules.Server``) with the devices of their fresh reports, and the samples with their readings.

        Only servers without devices of their own (those the service samples itself) take reports; a report
        sent before the server's start belongs to an earlier run and is ignored. Reported devices are named
        ``reported:<user>/<server>:<device>``, so two servers' device ``0`` never mix.
        """
        out, merged = [], dict(samples)
        for s in servers:
            at, report = self.latest.get((s.user, s.name), (None, None))
            if s.gpu_devices or report is None or at < s.started or now - at > self.max_age:
                out.append(s)
                continue
            devices = []
            for device, value in sorted(report.utilisation.items()):
                name = f"reported:{s.user}/{s.name}:{device}"
                devices.append(name)
                merged[name] = value
            out.append(replace(s, gpu_devices=tuple(devices)))
        live = {(s.user, s.name) for s in out}
        self.latest = {k: v for k, v in self.latest.items() if k in live}
        return out, merged


# ---------------------------------------------------------------------------
# The reporter (runs next to the server, as its user)
# ---------------------------------------------------------------------------


def reader(env: Mapping[str, str]) -> GpuUtilisation:
    """The JSON file of ``$WORKBENCH_GPU_UTILISATION_FILE`` (pretend GPUs, tests), else NVML."""
    path = env.get("WORKBENCH_GPU_UTILISATION_FILE")
    return FileUtilisation(path) if path else NvmlUtilisation()


def report_url(env: Mapping[str, str]) -> str:
    """Where reports go, from the server's environment (empty when the services URL is unknown)."""
    from workbench.lab.notifications import services_base_url

    base = services_base_url(env)
    return f"{base}{SESSIONS_SERVICE}/{REPORT_PATH}" if base else ""


def devices_of(env: Mapping[str, str]) -> list[str]:
    return [d.strip() for d in (env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if d.strip()]


def send(url: str, token: str, body: dict, timeout: float = 10.0) -> int:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the hub's own proxy
        return r.status


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.services.sessions.report", description=__doc__.split("\n")[0])
    p.add_argument("--every", type=float, default=30.0, help="seconds between reports (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="send one report and exit")
    args = p.parse_args(argv)
    env = os.environ if env is None else env
    logging.basicConfig(level=logging.INFO, format="[gpu-report] %(message)s", stream=sys.stderr)
    devices, url, token = devices_of(env), report_url(env), env.get("JUPYTERHUB_API_TOKEN", "")
    if not devices or not url or not token:
        log.info("nothing to report (devices %s, services URL %r, token %s)", devices, url, "set" if token else "unset")
        return 0
    source = reader(env)
    server = env.get("JUPYTERHUB_SERVER_NAME", "")
    log.info("reporting the utilisation of GPUs %s to %s every %gs", devices, url, args.every)
    while True:
        util = source.utilisation(devices)
        if util:
            try:
                send(url, token, {"server": server, "utilisation": util})
            except OSError as e:  # the hub may be restarting: the next round tries again
                log.warning("could not report: %s", e)
        if args.once:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    raise SystemExit(main())
