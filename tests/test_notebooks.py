"""The notebooks in notebooks/ run top to bottom in a fresh kernel, and are committed clean.

Each notebook runs with nbclient in an ipykernel started from this interpreter (a kernel spec
written to a temporary JUPYTER_PATH, so no user-level Jupyter set-up is needed), with a time
limit per notebook; any cell error fails the test. The kernels share a JAX compilation cache
directory for the session, so notebooks that start the same engine shapes compile them once.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_quickstart.ipynb", "02_serving.ipynb", "03_paged_kv_and_prefix_cache.ipynb",
            "04_sharding.ipynb", "05_benchmarks.ipynb"]
# Seconds for the whole notebook (and for any one cell) on this project's 2-core CPU machine.
NOTEBOOK_TIME_LIMIT = 300
KERNEL_NAME = "jaxllm-test-venv"


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_planned_notebook_is_there_and_the_readmes_link_them():
    names = [p.name for p in _notebooks()]
    assert set(EXPECTED) <= set(names), f"missing: {sorted(set(EXPECTED) - set(names))}"
    readme = (ROOT / "README.md").read_text()
    index = (NOTEBOOKS / "README.md").read_text()
    for name in names:
        assert f"notebooks/{name}" in readme, f"README.md does not link {name}"
        assert f"({name})" in index, f"notebooks/README.md does not link {name}"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_or_execution_counts(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"cell {i} of {path.name} has outputs: clear them"
            assert cell.get("execution_count") is None, f"cell {i} of {path.name} has an execution count"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name} carries widget state: clear it"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernel spec running this interpreter, found through a temporary JUPYTER_PATH."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    cache_dir = tmp_path_factory.mktemp("jax_compilation_cache")
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxllm test venv", "language": "python",
        "env": {"JAX_COMPILATION_CACHE_DIR": str(cache_dir)},
    }))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(jupyter_dir))
    yield KERNEL_NAME
    mp.undo()


def _cell_error_summary(exc: Exception) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))[-4000:]  # strip ANSI colours of tracebacks


@pytest.mark.timeout(NOTEBOOK_TIME_LIMIT + 60)
@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_without_errors(path, kernel_name):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=NOTEBOOK_TIME_LIMIT,
                            startup_timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(f"{path.name} failed:\n{_cell_error_summary(e)}", pytrace=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < NOTEBOOK_TIME_LIMIT, f"{path.name} took {elapsed:.0f} s (limit {NOTEBOOK_TIME_LIMIT} s)"
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran), "every code cell ran"
