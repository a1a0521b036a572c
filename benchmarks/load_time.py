"""Start-up cost of the default model's weights: GGUF conversion vs safetensors vs orbax restore.

  python benchmarks/load_time.py [--dtype bfloat16] [--repeats 2]

Rows (each: weights from files to concrete params on the default device, min over repeats):
  gguf convert       open + dequantize Q4_1/Q8_0 + un-permute + cast + place (jaxllm.loading.gguf_loader)
  safetensors        the same weights written as an HF folder (float32 safetensors), read + cast + place
  orbax restore      the converted params saved by save_params, restored by restore_params
and, for the tokenizer: transformers' conversion from the GGUF vocabulary vs the cached tokenizer.json.
The files sit in the OS page cache after the first repeat, so these are warm-cache figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx
from safetensors.numpy import save_file

from jaxllm.config import resolve_dtype
from jaxllm.loading import checkpoint as ckpt
from jaxllm.loading.default_model import default_gguf_path
from jaxllm.loading.gguf_loader import iter_hf_tensors, load_gguf, load_gguf_tokenizer, open_gguf
from jaxllm.loading.safetensors_loader import load_hf_folder


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(nnx.state(out[1]) if isinstance(out, tuple) else out)
        best = min(best, time.perf_counter() - t)
    return best, out


def write_safetensors_folder(gguf: Path, folder: Path) -> None:
    """An HF folder with the GGUF's dequantized float32 weights (what save_pretrained would write)."""
    c = open_gguf(gguf)
    tensors = {name: get() for name, get in iter_hf_tensors(c)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c.hf_config.to_dict()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    gguf = default_gguf_path()
    work = Path(tempfile.mkdtemp(prefix="jaxllm_load_time_"))
    try:
        rows = []
        t_gguf, (config, model, _) = timed(lambda: load_gguf(gguf, dtype), args.repeats)
        rows.append(("gguf convert (Q4_1 file)", t_gguf))

        (work / "hf").mkdir()
        write_safetensors_folder(gguf, work / "hf")
        t_st, _ = timed(lambda: load_hf_folder(work / "hf", dtype), args.repeats)
        rows.append(("safetensors (float32 file)", t_st))

        def save_restore_dir(i=[0]):  # orbax refuses to overwrite: one folder per save
            i[0] += 1
            return work / f"ckpt{i[0]}"

        d = save_restore_dir()
        t0 = time.perf_counter()
        ckpt.save_params(model, d, model_config=config, source=str(gguf))
        t_save = time.perf_counter() - t0
        t_restore, _ = timed(lambda: ckpt.restore_params(ckpt.abstract_model(config, dtype), d),
                             args.repeats)
        rows.append((f"orbax restore ({dtype.name} params)", t_restore))
        rows.append(("  (orbax save, once)", t_save))

        t0 = time.perf_counter()
        load_gguf_tokenizer(gguf, cache=False)
        t_tok = time.perf_counter() - t0
        load_gguf_tokenizer(gguf)  # fills the cache if empty
        t0 = time.perf_counter()
        load_gguf_tokenizer(gguf)
        t_tok_cached = time.perf_counter() - t0
        rows.append(("tokenizer from GGUF vocabulary", t_tok))
        rows.append(("tokenizer from cache (tokenizer.json)", t_tok_cached))

        n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
        print(f"\nSmolLM2-135M-Instruct ({n / 1e6:.1f}M params), dtype {dtype.name}, "
              f"{jax.devices()[0].platform}, min of {args.repeats}")
        print(f"{'step':40s} {'seconds':>8s} {'vs restore':>11s}")
        for name, t in rows:
            print(f"{name:40s} {t:8.2f} {t / t_restore:10.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
