"""Where a checkpoint's load goes (issue 9's start-up): one process per run, phases timed.

    python3 benchmarks/gpu/load_probe.py DIR --reader {mmap,safetensors} [--twice]
    python3 benchmarks/gpu/load_probe.py DIR --raw
    [--out F] [--note TEXT]

A run (a fresh process, as a server start is): ``import_s`` the imports (jax, jaxllm,
transformers' config reader), ``backend_s`` the first device op, ``config_s`` config.json,
``load_s`` ``load_params_from_tensors`` into bf16 on the default device, until every param is
ready (``load2_s`` the same again in the same process with ``--twice``: what the load costs
without the per-shape compiles and the first transfers' set-up). ``--reader mmap`` is the
loader's own reader (views of the memory-mapped files; the rows of 2026-12-04 with
``threads`` and ``readahead_mb`` ran 52cbb08, which had copy threads and read-ahead advice);
``--reader safetensors`` reads each tensor with safetensors' ``get_tensor`` on the
loading thread, the reader before 2026-12-04 (15:00).

``--raw``: the rates the load is made of, page cache warm: reading every tensor's bytes into
new host arrays on 1 and 8 threads; ``jax.device_put`` of 4 GiB of host arrays already in memory
and of the files' views, on 1 and 4 threads.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm.loading import weights  # noqa: E402
from offline_throughput import append_jsonl  # noqa: E402
from jaxllm.loading.safetensors_loader import (iter_safetensors, load_hf_config,  # noqa: E402
                                               mapped_tensors, safetensors_files)


def _safetensors_reader(files):
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, (lambda f=f, name=name: f.get_tensor(name))


def _load(folder: Path, config, reader: str):
    files = safetensors_files(folder)
    tensors = _safetensors_reader(files) if reader == "safetensors" else iter_safetensors(files)
    t = time.perf_counter()
    model = weights.load_params_from_tensors(
        weights.abstract_for(config, jnp.bfloat16), config, tensors, jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    return time.perf_counter() - t, model


def _rate(fn, items, threads: int) -> float:
    nbytes = sum(a.nbytes for a in items)
    t = time.perf_counter()
    if threads <= 1:
        out = [fn(a) for a in items]
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(fn, items))
    jax.block_until_ready([o for o in out if isinstance(o, jax.Array)])
    return nbytes / (time.perf_counter() - t) / 1e9


def _raw(folder: Path) -> dict:
    views = [v for p in safetensors_files(folder) for _, v in mapped_tensors(p)]
    row = {"checkpoint_gb": round(sum(v.nbytes for v in views) / 1e9, 3)}
    row["read_gbs_1t"] = round(_rate(np.array, views, 1), 3)
    row["read_gbs_8t"] = round(_rate(np.array, views, 8), 3)
    big = [v for v in views if v.ndim == 2]
    picked, total = [], 0
    for v in big:  # ~4 GiB of 2-d tensors
        if total >= 4 << 30:
            break
        picked.append(v)
        total += v.nbytes
    jax.block_until_ready(jax.device_put(np.ones(1024, np.float32)))
    for threads in (1, 4):
        row[f"put_views_gbs_{threads}t"] = round(_rate(jax.device_put, picked, threads), 3)
    host = [np.array(v) for v in picked]
    for threads in (1, 4):
        row[f"put_host_gbs_{threads}t"] = round(_rate(jax.device_put, host, threads), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--reader", choices=("mmap", "safetensors"), default="mmap")
    ap.add_argument("--twice", action="store_true")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    row = {"device": jax.devices()[0].device_kind, "note": args.note,
           "import_s": round(time.perf_counter() - T0, 3)}
    t = time.perf_counter()
    jax.block_until_ready(jnp.zeros(8) + 1)
    row["backend_s"] = round(time.perf_counter() - t, 3)
    if args.raw:
        row.update(mode="raw", **_raw(args.folder))
    else:
        t = time.perf_counter()
        _, config = load_hf_config(args.folder)
        row.update(mode="load", reader=args.reader,
                   config_s=round(time.perf_counter() - t, 3))
        secs, model = _load(args.folder, config, args.reader)
        row["load_s"] = round(secs, 3)
        gb = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 1e9
        row["load_gbs"] = round(gb / secs, 3)
        if args.twice:
            del model
            row["load2_s"] = round(_load(args.folder, config, args.reader)[0], 3)
        row["total_s"] = round(time.perf_counter() - T0, 3)
    print(json.dumps(row), flush=True)
    append_jsonl(args.out, [row])


if __name__ == "__main__":
    main()
