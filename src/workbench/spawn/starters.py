"""Starter notebooks: each user finds one for their kind of work in their home folder.

Notebooks are built here from plain cell lists (readable diffs, no JSON blobs in git) and
written at spawn time only if absent, so a user's edits are never overwritten. The spawner runs as
root: each file is created relative to the home opened without following symlinks, exclusively and
never through a symlink (:func:`workbench.sysusers.create_file_at`), so a user who puts a symlink
where a starter would go (``~/exercise-1.ipynb -> /etc/...``) gets nothing written or chowned.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from workbench.sysusers import create_file_at, open_dir_nofollow

_RESEARCH = [
    new_markdown_cell(
        "# Climatology with xarray on a Dask Gateway cluster\n\n"
        "This notebook builds ten years of synthetic daily temperature on a global grid, asks the "
        "centre's **Dask Gateway** for a cluster that grows and shrinks within your group's limits, "
        "and computes a monthly climatology.\n\n"
        "`Gateway()` needs no arguments: Workbench sets its address and your credentials."
    ),
    new_code_cell(
        "import os\n"
        "from dask_gateway import Gateway\n\n"
        "gateway = Gateway()\n"
        "options = gateway.cluster_options()\n"
        "options  # what your group may request per worker"
    ),
    new_code_cell(
        "max_workers = int(os.environ.get('WORKBENCH_DASK_MAX_WORKERS', '2'))\n"
        "cluster = gateway.new_cluster(options)\n"
        "cluster.adapt(minimum=1, maximum=max_workers)  # elastic, within your group's limit\n"
        "client = cluster.get_client()\n"
        "print('dashboard:', cluster.dashboard_link)\n"
        "cluster"
    ),
    new_code_cell(
        "import dask.array as da\n"
        "import numpy as np\n"
        "import pandas as pd\n"
        "import xarray as xr\n\n"
        "time = pd.date_range('2000-01-01', '2009-12-31', freq='D')\n"
        "lat = np.linspace(-87.5, 87.5, 36)  # a 5-degree grid\n"
        "lon = np.arange(0, 360, 5.0)\n"
        "doy = time.dayofyear.values\n"
        "# seasonal cycle (opposite in each hemisphere) + equator-to-pole gradient + weather noise\n"
        "season = da.from_array(-np.cos(2 * np.pi * (doy - 15) / 365.25), chunks=365)[:, None, None]  # coldest mid-January in the north\n"
        "hemisphere = da.from_array(np.sign(lat), chunks=-1)[None, :, None]\n"
        "gradient = da.from_array(30 * np.cos(np.deg2rad(lat)) - 10, chunks=-1)[None, :, None]\n"
        "noise = da.random.default_rng(42).normal(0, 3, (time.size, lat.size, lon.size), chunks=(365, -1, -1))\n"
        "temp = xr.DataArray(gradient + 12 * hemisphere * season + noise,\n"
        "                    dims=('time', 'lat', 'lon'),\n"
        "                    coords={'time': time, 'lat': lat, 'lon': lon},\n"
        "                    name='t2m', attrs={'units': 'degC'})\n"
        "temp"
    ),
    new_code_cell(
        "climatology = temp.groupby('time.month').mean('time').compute()\n"
        "zonal = climatology.mean('lon')\n"
        "table = zonal.sel(lat=[-47.5, 2.5, 47.5], method='nearest').to_pandas().round(1)\n"
        "table"
    ),
    new_markdown_cell("Always give the workers back when you are done (idle clusters are also stopped for you):"),
    new_code_cell("client.close()\ncluster.shutdown()"),
]

_COURSE = [
    new_markdown_cell(
        "# Exercise 1: vectorised statistics\n\n"
        "Course material from your instructor appears in a folder named after the course. "
        "Fill in the function below, then run the check cell."
    ),
    new_code_cell(
        "import numpy as np\n\n"
        "def standardise(x):\n"
        '    """Return (x - mean) / std, computed without a Python loop."""\n'
        "    x = np.asarray(x, dtype=float)\n"
        "    return (x - x.mean()) / x.std()  # <- your code here"
    ),
    new_code_cell(
        "z = standardise([2, 4, 4, 4, 5, 5, 7, 9])\n"
        "assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12, 'not standardised yet'\n"
        "print('Well done: mean 0, standard deviation 1')"
    ),
]

_STARTUP = [
    new_markdown_cell(
        "# GPU check\n\n"
        "Run this first in a GPU session: it tells you which GPUs this server was given, "
        "and says so clearly when there are none."
    ),
    new_code_cell(
        "import os, shutil, subprocess\n\n"
        "visible = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
        "print('CUDA_VISIBLE_DEVICES =', visible if visible is not None else '(not set)')\n"
        "smi = shutil.which('nvidia-smi')\n"
        "gpus = []\n"
        "if smi:\n"
        "    out = subprocess.run([smi, '--query-gpu=name,memory.total', '--format=csv,noheader'],\n"
        "                         capture_output=True, text=True)\n"
        "    gpus = [line for line in out.stdout.splitlines() if line.strip()]\n"
        "try:\n"
        "    import torch\n"
        "    if torch.cuda.is_available():\n"
        "        gpus = gpus or [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]\n"
        "except ImportError:\n"
        "    pass\n"
        "if gpus:\n"
        "    print(f'{len(gpus)} GPU(s) available:')\n"
        "    for g in gpus:\n"
        "        print('  -', g)\n"
        "else:\n"
        "    print('NO GPU in this session. Pick a GPU profile when you start your server, '\n"
        "          'or run on a machine that has one; CPU code below still works.')"
    ),
]

_ADMIN = [
    new_markdown_cell(
        "# Platform team\n\n"
        "You are a hub admin: the **Admin** page (`/hub/admin`) lists every user and server.\n\n"
        "The platform is described by one YAML file. Useful commands on the hub machine:\n\n"
        "```\n"
        "workbench check hub_config/demo.yaml   # validate a policy, show who may use what\n"
        "workbench up --config FILE             # run the embedded workbench with any policy\n"
        "```"
    ),
    new_code_cell("import os\nprint('hub API:', os.environ.get('JUPYTERHUB_API_URL'))"),
]

STARTERS = {
    "research": ("climatology-with-dask.ipynb", _RESEARCH),
    "course": ("exercise-1.ipynb", _COURSE),
    "startup": ("gpu-check.ipynb", _STARTUP),
    "admin": ("platform-tour.ipynb", _ADMIN),
}


def starter_notebooks(kinds: list[str]) -> dict[str, nbformat.NotebookNode]:
    """The starter notebooks for a user whose groups have these kinds (pure)."""
    out = {}
    for kind in kinds:
        if kind in STARTERS:
            fname, cells = STARTERS[kind]
            nb = new_notebook(cells=list(cells))
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            out[fname] = nb
    return out


def install_starters(
    home: str | os.PathLike, kinds: list[str], uid: int | None = None, gid: int | None = None
) -> list[str]:
    """Write missing starter notebooks into ``home``; never overwrite. Returns the files written."""
    written = []
    home_fd = open_dir_nofollow(home)  # a home replaced by a symlink is refused (OSError)
    try:
        for fname, nb in starter_notebooks(kinds).items():
            if create_file_at(home_fd, fname, nbformat.writes(nb).encode(), uid, gid):
                written.append(fname)
    finally:
        os.close(home_fd)
    return written
