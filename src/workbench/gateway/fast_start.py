"""How fast a Workbench Dask cluster starts, for every backend that runs our commands (local, Slurm): the scheduler
and worker commands, the workers' process start method and the scheduler preload (:class:`FastStartMixin`).

Where the time of "create a cluster, then 2 workers" went on the local backend (issue 12, target 3; see
benchmarks/README.md for the timeline): each process imports ``distributed`` (≈ 0.45 s on the 2-core machine);
the ``dask`` command line first loads every ``dask`` sub-command's entry point; each worker is a nanny process
that *spawns* the real worker as a fresh interpreter, importing everything a second time; and the scheduler
waits a fixed 0.25 s before telling the gateway its address. The cuts:

- ``python -m distributed.cli.dask_scheduler`` / ``dask_worker`` instead of ``dask scheduler`` / ``dask worker``;
- the nanny *forks* its worker (``distributed.worker.multiprocessing-method: fork``): the worker starts with
  ``distributed`` already imported; the nanny stays, so ``Client.restart()`` and the memory-limit kill work;
- :mod:`workbench.gateway.scheduler_preload` sends the first heartbeat as soon as the scheduler listens.
"""

from __future__ import annotations

from pathlib import Path

UPSTREAM_PRELOAD = "dask_gateway.scheduler_preload"
PRELOAD = "workbench.gateway.scheduler_preload"

# the nanny forks its worker process instead of spawning a new interpreter (distributed's default is spawn)
WORKER_ENVIRONMENT = {"DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"}


def scheduler_command(venv_bin: str | Path) -> list[str]:
    return [str(Path(venv_bin) / "python"), "-m", "distributed.cli.dask_scheduler"]


def worker_command(venv_bin: str | Path) -> list[str]:
    return [str(Path(venv_bin) / "python"), "-m", "distributed.cli.dask_worker"]


class FastStartMixin:
    """A dask-gateway backend mixin: schedulers load :mod:`workbench.gateway.scheduler_preload` instead of
    upstream's preload (same options; the first heartbeat goes out at once)."""

    def get_scheduler_command(self, cluster):
        return [PRELOAD if arg == UPSTREAM_PRELOAD else arg for arg in super().get_scheduler_command(cluster)]
