"""Unit tests of workbench.spawn.starters: notebooks per kind, install never overwrites, notebooks run."""

from __future__ import annotations

import os
import shutil
import stat

import nbformat
import pytest

from workbench.spawn.starters import STARTERS, install_starters, starter_notebooks

EXPECTED_FILES = {
    "research": "climatology-with-dask.ipynb",
    "course": "exercise-1.ipynb",
    "startup": "gpu-check.ipynb",
    "admin": "platform-tour.ipynb",
}


@pytest.mark.parametrize("kind, fname", sorted(EXPECTED_FILES.items()))
def test_one_notebook_per_kind_and_valid(kind, fname):
    nbs = starter_notebooks([kind])
    assert list(nbs) == [fname]
    nb = nbs[fname]
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"] == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert nb.cells[0].cell_type == "markdown"
    assert any(c.cell_type == "code" for c in nb.cells)
    # every code cell at least compiles
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(cell.source, f"{fname} cell", "exec")


def test_every_kind_has_a_starter():
    assert set(STARTERS) == {"research", "course", "startup", "admin"}


def test_several_kinds_and_unknown_kinds():
    nbs = starter_notebooks(["admin", "research", "nonsense", "research"])
    assert list(nbs) == ["platform-tour.ipynb", "climatology-with-dask.ipynb"]
    assert starter_notebooks([]) == {}
    assert starter_notebooks(["unknown"]) == {}


def test_notebooks_are_independent_copies():
    a = starter_notebooks(["course"])["exercise-1.ipynb"]
    a.cells.append(nbformat.v4.new_code_cell("print('mine')"))
    a.metadata["x"] = 1
    b = starter_notebooks(["course"])["exercise-1.ipynb"]
    assert len(b.cells) == len(a.cells) - 1
    assert "x" not in b.metadata


def test_research_notebook_uses_gateway_and_group_limit():
    nb = starter_notebooks(["research"])["climatology-with-dask.ipynb"]
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "Gateway()" in code
    assert "WORKBENCH_DASK_MAX_WORKERS" in code
    assert "cluster.shutdown()" in code


def test_install_writes_missing(tmp_path):
    written = install_starters(tmp_path, ["course", "startup"])
    assert written == ["exercise-1.ipynb", "gpu-check.ipynb"]
    assert sorted(os.listdir(tmp_path)) == ["exercise-1.ipynb", "gpu-check.ipynb"]
    nb = nbformat.read(str(tmp_path / "exercise-1.ipynb"), as_version=4)
    nbformat.validate(nb)
    assert nb == starter_notebooks(["course"])["exercise-1.ipynb"]


def test_install_never_overwrites(tmp_path):
    mine = tmp_path / "exercise-1.ipynb"
    mine.write_text("my own work, not even JSON")
    written = install_starters(tmp_path, ["course", "admin"])
    assert written == ["platform-tour.ipynb"]
    assert mine.read_text() == "my own work, not even JSON"
    # a second call writes nothing and changes nothing
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert install_starters(tmp_path, ["course", "admin"]) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_install_keeps_user_edits(tmp_path):
    install_starters(tmp_path, ["course"])
    path = tmp_path / "exercise-1.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].source = "def standardise(x):\n    return x"
    nbformat.write(nb, str(path))
    assert install_starters(tmp_path, ["course"]) == []
    assert "return x" in nbformat.read(str(path), as_version=4).cells[1].source


def test_install_chown_to_same_owner(tmp_path):
    st = os.stat(tmp_path)
    assert install_starters(tmp_path, ["admin"], uid=st.st_uid, gid=st.st_gid) == ["platform-tour.ipynb"]
    f = os.stat(tmp_path / "platform-tour.ipynb")
    assert (f.st_uid, f.st_gid) == (st.st_uid, st.st_gid)
    assert stat.S_ISREG(f.st_mode)


def test_install_nothing_for_unknown_kinds(tmp_path):
    assert install_starters(tmp_path, ["nope"]) == []
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# run the notebooks that need no services (nbclient + the venv's python3 kernel)
# ---------------------------------------------------------------------------


def _stream_text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o.output_type != "error", f"{o.get('ename')}: {o.get('evalue')}"
            if o.output_type == "stream":
                out.append(o.text)
    return "".join(out)


def _execute(nb, cwd, env=None):
    nbclient = pytest.importorskip("nbclient")
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    # ``env`` goes to the kernel manager's start_kernel: the kernel's environment, not ours
    return client.execute(**({"env": env} if env is not None else {}))


def test_course_notebook_runs(tmp_path):
    install_starters(tmp_path, ["course"])
    nb = nbformat.read(str(tmp_path / "exercise-1.ipynb"), as_version=4)
    _execute(nb, tmp_path)
    assert "Well done: mean 0, standard deviation 1" in _stream_text(nb)


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi; the no-GPU text is not expected"
)
def test_gpu_check_notebook_says_no_gpu(tmp_path):
    install_starters(tmp_path, ["startup"])
    nb = nbformat.read(str(tmp_path / "gpu-check.ipynb"), as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    _execute(nb, tmp_path, env)
    text = _stream_text(nb)
    assert "CUDA_VISIBLE_DEVICES = (not set)" in text
    assert "NO GPU in this session." in text
    assert "GPU(s) available" not in text


def test_course_notebook_check_fails_for_wrong_answer(tmp_path):
    """The check cell really checks: a wrong solution raises the assertion."""
    nb = starter_notebooks(["course"])["exercise-1.ipynb"]
    nb.cells[1].source = "import numpy as np\n\ndef standardise(x):\n    return np.asarray(x, dtype=float)"
    nbclient = pytest.importorskip("nbclient")
    with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
        _execute(nb, tmp_path)
    assert "not standardised yet" in str(info.value)
