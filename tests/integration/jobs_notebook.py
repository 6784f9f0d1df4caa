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
