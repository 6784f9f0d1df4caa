"""The scheduler preload of every Workbench Dask cluster: dask-gateway's own preload
(``dask_gateway.scheduler_preload``), except that the scheduler's first heartbeat to the gateway
goes out as soon as the scheduler listens instead of 0.25 s later.

The first heartbeat is what tells the gateway the scheduler's address: until it arrives the
cluster is not RUNNING, ``Gateway.new_cluster()`` does not return and no worker can be started.
Upstream waits a fixed 0.25 s before sending it (``GatewaySchedulerService.heartbeat_initial``,
not configurable). Everything else (the options, the API the gateway calls, later heartbeats
every ``cluster_heartbeat_period``) is upstream's. This module runs inside the scheduler process,
so it imports nothing from Workbench.
"""

from __future__ import annotations

import sys

import click
from dask_gateway import scheduler_preload as upstream

UPSTREAM = "dask_gateway.scheduler_preload"


class FastHeartbeatService(upstream.GatewaySchedulerService):
    """Upstream's scheduler service with the first heartbeat sent at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.heartbeat_period:  # 0 means "heartbeats only when scaling": leave that as upstream has it
            self.heartbeat_initial = 0.0


def _setup(scheduler, dg_adaptive_period, dg_heartbeat_period, dg_idle_timeout, dg_api_address):
    # upstream's dask_setup, with FastHeartbeatService
    try:
        host, port = dg_api_address.split(":")
        port = int(port)
    except Exception:
        upstream.logger.error("Invalid api address %r", dg_api_address, exc_info=True)
        sys.exit(1)
    try:
        service = FastHeartbeatService(
            scheduler,
            gateway=upstream.make_gateway_client(),
            adaptive_period=dg_adaptive_period,
            heartbeat_period=dg_heartbeat_period,
            idle_timeout=dg_idle_timeout,
        )
        service.listen((host, port))
    except Exception:
        upstream.logger.error("Error starting gateway service", exc_info=True)
        sys.exit(1)
    scheduler.services["gateway"] = service


# the same command-line options as upstream's preload (--dg-*), so the gateway's command line is unchanged
dask_setup = click.Command("dask_setup", params=list(upstream.dask_setup.params), callback=_setup)
