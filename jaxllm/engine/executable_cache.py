"""The engine's compiled step programs kept on disk, so a restart skips tracing and lowering.

XLA's persistent compilation cache (``--compilation-cache-dir``) is keyed by the lowered
program: a restart still traces and lowers every step program only to find its key, and with
the 8B shape that was 11-19 s of a 29-45 s restart on the H200 (51 programs on one thread;
benchmarks/RESULTS.md, 2026-12-04 15:50). Here each program the runner compiles at start-up is
serialized (``jax.experimental.serialize_executable``) under a key of everything that decides
it, and a restart with the same key deserializes it instead.

The key (``ExecutableCache.key``): a salt of the jax and jaxlib versions, the backend and its
devices, ``XLA_FLAGS``, every ``JAXLLM_*`` setting in the environment, the jax settings that
change a trace, and a hash of the sources of jaxllm, pallas_kernels and sharding (any edit of
the code makes every entry stale); then per program its name, the runner's static description
(the model's structure with its static attributes, the cache and bucket shapes, the compiler
options) and every argument's tree structure and shape / dtype / sharding. An entry that cannot
be read or loaded is ignored (the program is lowered and compiled as without the cache);
writes go to a temporary file renamed into place, so a reader never sees half an entry.
Entries live in a folder per salt; the ``KEEP_SALTS`` most recently used folders are kept and
older ones deleted, so edits of the code (each a new salt) do not fill the disk.

Where: ``JAXLLM_EXECUTABLE_CACHE_DIR`` when set ("" turns it off); otherwise the folder
``jaxllm-executables`` inside jax's compilation cache directory when one is set (``jaxllm
serve`` / ``generate`` set it by default); otherwise off. Only the one-device runner uses it
(sharded and pipelined runners compile as they go), and only on a GPU (``PLATFORMS``).

A deserialized executable runs what was compiled, so a stale entry would serve another model's
program: hence the conservative salt. Entries are trusted as the compilation cache's are (a
pickle; never point this at a folder others can write).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax

logger = logging.getLogger(__name__)

ENV_DIR = "JAXLLM_EXECUTABLE_CACHE_DIR"
SUBDIR = "jaxllm-executables"
_SOURCE_PACKAGES = ("jaxllm", "pallas_kernels", "sharding")
# jax settings that change what a trace produces.
_JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
              "jax_default_prng_impl", "jax_threefry_partitionable", "jax_use_shardy_partitioner")


# Backends whose serialized executables load in another process. XLA:CPU's do not in jax 0.11
# (a CPU program reloaded in a new process failed with "Function wrapped_iota not found"), so
# the CPU keeps lowering at every start (its programs compile in seconds anyway).
PLATFORMS = ("gpu",)


def cache_dir() -> Path | None:
    """The folder entries live in (module docstring), or None when the cache is off (or the
    backend is not one of ``PLATFORMS``)."""
    if jax.default_backend() not in PLATFORMS:
        return None
    env = os.environ.get(ENV_DIR)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = _jax_cache_dir()
    return Path(base).expanduser() / SUBDIR if base else None


def _jax_cache_dir() -> str | None:
    return jax.config.jax_compilation_cache_dir


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in _SOURCE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def salt() -> str:
    """What every entry's key starts from: the code, the versions, the devices, the settings."""
    import jaxlib

    devices = jax.devices()
    parts = [
        jax.__version__, jaxlib.__version__, jax.default_backend(),
        repr(sorted({(d.platform, d.device_kind) for d in devices})), str(len(devices)),
        os.environ.get("XLA_FLAGS", ""),
        repr(sorted((k, v) for k, v in os.environ.items()
                    if k.startswith("JAXLLM_") and k != ENV_DIR)),
        repr([(f, getattr(jax.config, f, None)) for f in _JAX_FLAGS]),
        _source_hash(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _prune(root: Path, keep: int) -> None:
    """Deletes the salt folders under ``root`` beyond the ``keep`` most recently used."""
    import shutil

    folders = sorted((d for d in root.iterdir() if d.is_dir()),
                     key=lambda d: d.stat().st_mtime, reverse=True)
    for d in folders[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sharding = getattr(x, "sharding", None)
        return f"{tuple(x.shape)}:{x.dtype}:{getattr(x, 'weak_type', False)}:{sharding}"
    return repr(x)


def static_description(obj: Any) -> str:
    """A repr without the memory addresses a repr may carry (``<function f at 0x...>``), for
    describing closed-over statics such as an NNX GraphDef in a key."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


# Salt folders kept under the root (each holds the entries of one code / versions / settings
# state); the least recently used beyond these are deleted, so a developer's edits do not pile
# up entries no start can use again (the 8B's programs take ~30 MB a configuration).
KEEP_SALTS = 8


class ExecutableCache:
    """Compiled programs under ``root/<salt>/``, one file per key (module docstring)."""

    def __init__(self, root: Path, context: str):
        """context: the runner's static description (what the programs close over)."""
        the_salt = salt()
        self.root = Path(root) / the_salt[:16]
        self._base = hashlib.sha256((the_salt + "\n" + context).encode()).hexdigest()
        self.hits = self.misses = 0
        self._count = threading.Lock()  # load() runs on several threads
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.utime(self.root)  # most recently used
            _prune(Path(root), keep=KEEP_SALTS)
        except OSError as e:
            logger.warning("executable cache: %s", e)

    def key(self, name: str, args: Any) -> str:
        """The entry of program ``name`` called with ``args`` (arrays, ShapeDtypeStructs and
        static values, as the jitted function takes them)."""
        leaves, treedef = jax.tree.flatten(args)
        text = "\n".join([self._base, name, str(treedef), *map(_describe, leaves)])
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.jaxexec"

    def load(self, key: str, devices: list) -> jax.stages.Compiled | None:
        """The compiled program of ``key`` loaded onto ``devices`` (those it was compiled for),
        or None (absent, unreadable or not loadable)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(key)
        if not path.is_file():
            with self._count:
                self.misses += 1
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = deserialize_and_load(payload, in_tree, out_tree,
                                            backend=devices[0].client,
                                            execution_devices=devices)
        except Exception as e:  # a stale or damaged entry: compile instead
            logger.warning("executable cache: ignoring %s (%s: %s)", path.name,
                           type(e).__name__, e)
            with self._count:
                self.misses += 1
            return None
        with self._count:
            self.hits += 1
        return compiled

    def load_value(self, key: str) -> Any:
        """A JSON value stored under ``key`` (a figure derived from a compile), or None."""
        import json

        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())["value"] if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store_value(self, key: str, value: Any) -> None:
        import json

        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"value": value}, f)
            os.replace(tmp, self.root / f"{key}.json")
        except OSError as e:
            logger.warning("executable cache: not storing a value (%s)", e)

    def store(self, key: str, compiled: jax.stages.Compiled) -> None:
        """Writes ``compiled`` under ``key``; a program that cannot be serialized is skipped
        with a warning (it compiles again at the next start)."""
        from jax.experimental.serialize_executable import serialize

        tmp = None
        try:
            blob = pickle.dumps(serialize(compiled))
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))
        except Exception as e:
            logger.warning("executable cache: not storing a program (%s: %s)",
                           type(e).__name__, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
