"""vLLM's profiler API, the JAX way: ``LLM.start_profile()`` / ``stop_profile()`` (and the
server's ``POST /start_profile`` / ``/stop_profile``) record a ``jax.profiler`` trace: XLA's
device timeline (every kernel of every step program) and the host's Python and runtime
activity, written when the profile stops as TensorBoard / XProf files
(``plugins/profile/<run>/*.xplane.pb``, also readable by Perfetto through XProf's
converters) under the folder set in ``JAXLLM_PROFILER_DIR`` or, so vLLM's set-up works as
it is, ``VLLM_TORCH_PROFILER_DIR``. Without either, profiling is off: the calls raise and
the server has no such routes (vLLM's behaviour).

A JAX trace covers the whole process (every device, every engine replica in it), so one
profile runs at a time; starting a second, or stopping none, is a RuntimeError.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("jaxllm")

PROFILER_DIR_ENV_VARS = ("JAXLLM_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")

_lock = threading.Lock()
_running: str | None = None  # the folder of the trace being recorded


def profiler_dir() -> str | None:
    """The folder traces go to, from the environment (the first of PROFILER_DIR_ENV_VARS
    set), or None: profiling off."""
    for name in PROFILER_DIR_ENV_VARS:
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    return None


def start_profile() -> str:
    """Starts recording; returns the folder. RuntimeError when profiling is off or a profile
    is already running."""
    global _running
    import jax

    folder = profiler_dir()
    if folder is None:
        raise RuntimeError("Profiler is not enabled: set JAXLLM_PROFILER_DIR (or vLLM's "
                           "VLLM_TORCH_PROFILER_DIR) to the folder for the traces.")
    with _lock:
        if _running is not None:
            raise RuntimeError(f"A profile is already running (into {_running}); stop it "
                               "first.")
        os.makedirs(folder, exist_ok=True)
        jax.profiler.start_trace(folder)
        _running = folder
    logger.info("profiling into %s (stop_profile writes the trace)", folder)
    return folder


def stop_profile() -> str:
    """Stops recording and writes the trace; returns its folder. RuntimeError when no
    profile runs."""
    global _running
    import jax

    with _lock:
        if _running is None:
            raise RuntimeError("No profile is running: start_profile() first.")
        jax.profiler.stop_trace()
        folder, _running = _running, None
    logger.info("profile written under %s", folder)
    return folder
