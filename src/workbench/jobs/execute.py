"""What runs inside a notebook job, as the user's own account: ``python -m workbench.jobs.execute``.

1. creates the run folder (``~/jobs/<name>/<run>``) and, with ``--log``, sends its output to ``job.log`` there;
2. reads the notebook, injects the parameters papermill's way: a cell tagged ``injected-parameters`` after the
   cell tagged ``parameters`` (or first, without one), so the notebook's defaults are overridden;
3. executes it with nbclient in the run folder (files the notebook writes land there), and writes the executed
   notebook, with its outputs, into the run folder even when a cell fails (exit 1 then);
4. writes ``job.exit`` (exit code and time) into the run folder;
5. with gateway access (``DASK_GATEWAY__ADDRESS`` in its environment and the run's token in the run folder's
   ``.gateway-token``, which it reads into ``JUPYTERHUB_API_TOKEN`` and removes), in a ``finally`` stops the
   clusters tagged with this job's id (``WORKBENCH_JOB_ID``; :mod:`workbench.jobs.gateway`).

Runs only as the user (never as root): everything it opens is the user's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def inject_parameters(nb, params: dict):
    """Insert the parameters cell (papermill's convention) into ``nb``; returns ``nb``."""
    import nbformat

    from workbench.jobs.model import parameters_source

    if not params:
        return nb
    cell = nbformat.v4.new_code_cell(parameters_source(params))
    cell.metadata["tags"] = ["injected-parameters"]
    cells = nb.cells
    index = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    cells.insert(0 if index is None else index + 1, cell)
    return nb


def run(notebook: str, run_dir: str, params: dict) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(notebook, as_version=4)
    inject_parameters(nb, params)
    out = os.path.join(run_dir, os.path.basename(notebook))
    kernel = nb.metadata.get("kernelspec", {}).get("name") or "python3"
    client = NotebookClient(nb, timeout=None, kernel_name=kernel, resources={"metadata": {"path": run_dir}})
    print(f"[workbench job] running {notebook} in {run_dir} with parameters {json.dumps(params)}", flush=True)
    started = time.time()
    code = 0
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"[workbench job] a cell failed:\n{e}", flush=True)
        code = 1
    finally:
        nbformat.write(nb, out)
    print(f"[workbench job] wrote {out} after {time.time() - started:.1f}s, exit {code}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.jobs.execute", description=__doc__.splitlines()[0])
    p.add_argument("--notebook", required=True, help="the notebook to run (absolute path)")
    p.add_argument("--run-dir", required=True, help="the run folder: outputs, log, files the notebook writes")
    p.add_argument("--parameters", default="{}", help="a JSON object of parameters")
    p.add_argument("--log", action="store_true", help="send this process's output to <run-dir>/job.log")
    args = p.parse_args(argv)
    if os.geteuid() == 0:
        print("workbench.jobs.execute: refusing to run as root; jobs run as their user's account", file=sys.stderr)
        return 2
    os.makedirs(args.run_dir, mode=0o700, exist_ok=True)
    if args.log:
        fd = os.open(
            os.path.join(args.run_dir, "job.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    os.chdir(args.run_dir)
    load_token(args.run_dir, os.environ)
    gateway = gateway_of(os.environ)
    code = 1
    try:
        code = run(args.notebook, args.run_dir, json.loads(args.parameters))
    finally:
        stop_run_clusters(gateway, os.environ.get("WORKBENCH_JOB_ID", ""))
        write_exit(args.run_dir, code)
    return code


def gateway_of(environ) -> tuple[str, str] | None:
    """``(gateway address, token)`` when the run was given gateway access, else None (pure)."""
    address, token = environ.get("DASK_GATEWAY__ADDRESS", ""), environ.get("JUPYTERHUB_API_TOKEN", "")
    return (address, token) if address and token else None


def load_token(run_dir: str, environ) -> bool:
    """Move the run's gateway token from ``<run_dir>/.gateway-token`` (written by the jobs service as this
    user, mode 0600) into ``environ["JUPYTERHUB_API_TOKEN"]`` and remove the file; False without one."""
    from workbench.jobs.gateway import TOKEN_FILE

    path = os.path.join(run_dir, TOKEN_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd) as f:
        token = f.read().strip()
    os.unlink(path)
    if token:
        environ["JUPYTERHUB_API_TOKEN"] = token
    return bool(token)


def stop_run_clusters(gateway: tuple[str, str] | None, job_id: str) -> None:
    """Stop the clusters this run created (tagged with its job id), reporting but never raising."""
    if gateway is None or not job_id:
        return
    from workbench.jobs.gateway import stop_run_clusters as stop

    try:
        stopped = stop(*gateway, job_id)
    except (OSError, ValueError) as e:
        print(f"[workbench job] could not stop the run's Dask clusters: {e}", flush=True)
        return
    if stopped:
        print(f"[workbench job] stopped Dask cluster(s) of this run: {', '.join(stopped)}", flush=True)


def write_exit(run_dir: str, code: int) -> None:
    """``job.exit`` in the run folder: ``<exit code> <unix time>``, for an engine that did not start this
    process (the embedded engine after a restart of the jobs service)."""
    fd = os.open(os.path.join(run_dir, "job.exit"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{code} {time.time():.3f}\n")


if __name__ == "__main__":
    sys.exit(main())
