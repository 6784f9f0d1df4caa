"""The parameterised notebook the notebook-job tests run (test_jobs, test_jobs_local, test_jobs_lab, the browser test).

Its parameters cell sets ``n = 1`` and ``sleep = 0``; the next cell sleeps ``sleep`` seconds, writes ``n * 2`` to
``result.txt`` and prints ``result <n*2> <Unix user> <CUDA_VISIBLE_DEVICES> <parent pid>`` (the kernel's parent is
the process that ran the notebook: the tests tell the jobs engine from the user's server by it)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat

from workbench.sysusers import USER_PREFIX, ensure_system_user

NOTEBOOK = nbformat.v4.new_notebook(
    cells=[
        nbformat.v4.new_code_cell("n = 1\nsleep = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, time, getpass\ntime.sleep(sleep)\nopen('result.txt', 'w').write(str(n * 2))\n"
            "print('result', n * 2, getpass.getuser(), os.environ.get('CUDA_VISIBLE_DEVICES'), os.getppid())"
        ),
    ],
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)


def put_notebook(user: str, name: str = "calc.ipynb") -> Path:
    """Write the notebook into ``wb-<user>``'s home, owned by that account."""
    e = ensure_system_user(f"{USER_PREFIX}{user}")
    path = Path(e.pw_dir, name)
    nbformat.write(NOTEBOOK, path)
    os.chown(path, e.pw_uid, e.pw_gid)
    return path


DASK_NOTEBOOK = nbformat.v4.new_notebook(
    cells=[
        nbformat.v4.new_code_cell("hold = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, time\nopen('token.txt', 'w').write(os.environ.get('JUPYTERHUB_API_TOKEN', ''))\n"
            "from dask_gateway import Gateway\ng = Gateway()\nc = g.new_cluster()\nc.scale(1)\n"
            "client = c.get_client()\nclient.wait_for_workers(1, timeout=300)\n"
            "r = client.submit(lambda x: x + 1, 41).result()\nopen('result.txt', 'w').write(str(r))\n"
            "print('cluster', c.name, 'result', r)\ntime.sleep(hold)"
        ),
    ],
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)


def put_dask_notebook(user: str, name: str = "dask_job.ipynb") -> Path:
    """Write a notebook into the user's home that creates a Dask Gateway cluster with no arguments (the job's
    environment), computes 41 + 1 on a worker into ``result.txt``, writes the job's ``JUPYTERHUB_API_TOKEN``
    into ``token.txt`` (for the test to try after the run) and then sleeps ``hold`` seconds."""
    from workbench.sysusers import system_username

    e = ensure_system_user(system_username(user))
    path = Path(e.pw_dir, name)
    nbformat.write(DASK_NOTEBOOK, path)
    os.chown(path, e.pw_uid, e.pw_gid)
    return path
