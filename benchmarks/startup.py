"""Time to first served request (issue 9: under 2 minutes for the 8B shape, the load from disk
and the compile of every step bucket included): ``jaxllm serve`` on a checkpoint folder, from
the process's spawn to its first completion, with XLA's persistent compilation cache empty
(cold) and then again in a new process with that cache filled (a restart).

    python3 benchmarks/startup.py write DIR --tokenizer TOK [--shape llama3-8b] [--shard-gb 5]
    python3 benchmarks/startup.py [--out F] serve DIR [--runs 2] [--cache-dir D] [-- SERVE ARGS]
    python3 benchmarks/startup.py --smoke   # CPU: the tiny shape written, then served twice

``write`` makes the HF folder ``save_pretrained`` would: config.json, safetensors shards of at
most ``--shard-gb`` GB with their index, bf16 weights drawn N(0, 0.02) once per distinct shape
(norms 1), and the tokenizer folder TOK copied in. Random weights in a real shape load and
compile like real ones; a tokenizer smaller than the model's vocabulary only decodes the ids it
has.

``serve`` runs ``python3 -m jaxllm.cli serve DIR --compilation-cache-dir D`` ``--runs`` times, one
process after the other, D emptied before the first run unless ``--keep-cache``. Each run polls
``GET /health`` every 0.1 s, sends one ``POST /v1/completions`` (4 prompt ids, 8 tokens,
greedy), then SIGTERMs the server, which must exit 0 (graceful shutdown). A row per run:

  first_s     spawn to the first completion's response: the time to first served request
  ready_s     the server's own "ready N s after start" (load + fuse + KV sizing + compiles)
  load_s      the weights from the folder to the device ("loaded ... in N s"), of which
              config_s (config.json; mostly importing transformers), weights_s (the tensors
              read and placed, after the config) and tokenizer_s; ahead_gb: the GB copied to
              the device on a thread while the config was read
  arrays_gib, in_use_gib   device memory the KV pool was sized after: the live arrays' bytes
              (what sizes it) and the allocator's bytes in use
  fuse_s, size_s, compile_s   the engine's other start-up phases, from its log; of compile_s:
              lowering_s (the programs traced and lowered on the main thread), compiles_sum_s
              (the compiles' seconds summed over the threads) and exec_load_s (the programs
              loaded from the executable cache)
  programs, pages             the step programs compiled and the KV pages sized
  exit_code   the server's status after SIGTERM

On a machine with a page cache larger than the checkpoint, a folder written just before is read
from memory: say so beside the figures (``--note``), the disk's speed is not in them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from offline_throughput import SHAPES, append_jsonl, hf_llama_config  # noqa: E402

# The engine's and the server's start-up log lines (jaxllm/engine/llm_engine.py, server/cli.py).
_PHASES = {
    "load_s": r"loaded (?!the tokenizer).* in ([0-9.]+) s",
    "config_s": r"read config.json in ([0-9.]+) s",
    "weights_s": r"placed [0-9.]+ GB of weights from \d+ files in ([0-9.]+) s",
    "ahead_gb": r"\(([0-9.]+) GB of them copied on a thread beside the config's read\)",
    "tokenizer_s": r"loaded the tokenizer in ([0-9.]+) s",
    "fuse_s": r"fused q/k/v and gate/up projections in ([0-9.]+) s",
    "size_s": r"sized the KV pool in ([0-9.]+) s",
    "compile_s": r"compiled \d+ step programs \(\d+ token buckets\) in ([0-9.]+) s",
    "lowering_s": r"programs lowered in ([0-9.]+) s",
    "compiles_sum_s": r"\(([0-9.]+) s of compiles in all\)",
    "exec_load_s": r"programs loaded in ([0-9.]+) s",
    "ready_s": r"ready ([0-9.]+) s after start",
}
_COUNTS = {"programs": r"compiled (\d+) step programs", "pages": r"KV cache: (\d+) pages"}
# The device memory the pool was sized after (GiB): the live arrays' and the allocator's figure.
_MEMORY = {"arrays_gib": r"before the KV pool: arrays ([0-9.]+) GiB",
           "in_use_gib": r"allocator in use ([0-9.]+) GiB"}


def _hf_names(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint in SHAPES' terms, in HF's order."""
    E, F, V, D = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["head_dim"]
    H, K = s["num_attention_heads"], s["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, E))]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (H * D, E)),
                (p + "self_attn.k_proj.weight", (K * D, E)),
                (p + "self_attn.v_proj.weight", (K * D, E)),
                (p + "self_attn.o_proj.weight", (E, H * D)),
                (p + "mlp.gate_proj.weight", (F, E)), (p + "mlp.up_proj.weight", (F, E)),
                (p + "mlp.down_proj.weight", (E, F)),
                (p + "input_layernorm.weight", (E,)), (p + "post_attention_layernorm.weight", (E,))]
    out.append(("model.norm.weight", (E,)))
    if not s["tie_word_embeddings"]:
        out.append(("lm_head.weight", (V, E)))
    return out


def write_checkpoint(folder: Path, shape: str, tokenizer: Path | None, shard_gb: float = 5.0,
                     seed: int = 0) -> int:
    """Writes a random bf16 HF Llama folder of ``SHAPES[shape]``; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    if s["architecture"] != "LlamaForCausalLM":
        raise ValueError(f"{shape}: only Llama shapes are written")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_llama_config(shape, tie_word_embeddings=s["tie_word_embeddings"], dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(folder))
    names = _hf_names(s)
    limit = int(shard_gb * 1e9)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in names:
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    # One draw per distinct shape, written under every name of that shape: drawing 8B values
    # took 230 s on the GPU machine's host, and a load's speed does not depend on the values.
    drawn: dict[tuple[int, ...], torch.Tensor] = {}
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        tensors = {}
        for name, shp in shard:
            if shp not in drawn:
                drawn[shp] = (torch.ones(shp, dtype=torch.bfloat16) if len(shp) == 1 else
                              torch.empty(shp, dtype=torch.bfloat16).normal_(0.0, 0.02,
                                                                             generator=gen))
            tensors[name] = drawn[shp].clone()  # safetensors refuses shared storage
            weight_map[name] = fname
            total += drawn[shp].numel() * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def parse_startup_log(text: str) -> dict:
    """The start-up phases, memory figures and counts (``_PHASES``, ``_MEMORY``, ``_COUNTS``)
    found in a server's log."""
    row = {}
    for key, pat in {**_PHASES, **_MEMORY, **_COUNTS}.items():
        m = re.search(pat, text)
        if m:
            row[key] = (int if key in _COUNTS else float)(m.group(1))
    return row


def serve_once(folder: Path, cache_dir: Path, extra: list[str], log_path: Path | None = None,
               timeout: float = 540.0) -> dict:
    """One ``jaxllm serve`` process: spawned, polled until healthy, asked for one completion,
    SIGTERMed. Returns the row (module docstring); ``error`` says what failed, if anything."""
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxllm.cli", "serve", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--compilation-cache-dir", str(cache_dir), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(REPO))
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    row: dict = {"cmd": " ".join(cmd[1:])}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before serving")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"not healthy after {timeout:.0f} s")
            try:
                if _http(base + "/health", timeout=1.0)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        row["health_s"] = time.perf_counter() - t0
        status, models = _http(base + "/v1/models")
        model = models["data"][0]["id"]
        status, out = _http(base + "/v1/completions", {
            "model": model, "prompt": [1, 2, 3, 4], "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True}, timeout=120.0)
        row["first_s"] = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"the first completion got HTTP {status}: {out}")
        row["completion_tokens"] = out["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - reported in the row, the server still stopped
        row["error"] = str(e)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            row["exit_code"] = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            row["exit_code"] = proc.wait()
            row.setdefault("error", "no exit within 90 s of SIGTERM")
        reader.join(timeout=10)
    text = "".join(lines)
    if log_path is not None:
        log_path.write_text(text)
    if "error" in row:
        row["log_tail"] = text[-2000:]
    return {**row, **parse_startup_log(text)}


def serve_runs(folder: Path, runs: int, cache_dir: Path | None, extra: list[str],
               keep_cache: bool = False, log_dir: Path | None = None) -> list[dict]:
    """``runs`` server processes one after the other over one compilation cache (emptied first
    unless ``keep_cache``): the first cold, the others restarts."""
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="jaxllm-startup-cache-")
        cache_dir = Path(tmp.name)
    elif not keep_cache and cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for i in range(runs):
            cold = i == 0 and not keep_cache
            log = log_dir / f"serve_{i}.log" if log_dir is not None else None
            row = serve_once(folder, cache_dir, extra, log)
            rows.append({"run": i, "cache": "cold" if cold else "warm", "extra": " ".join(extra),
                         **row})
            print(_fmt(rows[-1]), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def _fmt(r: dict) -> str:
    cols = ("first_s", "ready_s", "load_s", "fuse_s", "size_s", "compile_s", "lowering_s",
            "compiles_sum_s", "exec_load_s")
    figs = " ".join(f"{c}={r[c]:.1f}" for c in cols if c in r)
    return (f"run {r['run']} ({r['cache']}): {figs} programs={r.get('programs')} "
            f"pages={r.get('pages')} exit={r.get('exit_code')}"
            + (f" ERROR {r['error']}" if "error" in r else ""))


def _smoke(out: Path | None) -> int:
    """CPU: the tiny shape (sharded, so the index is read too) with the embedded model's
    tokenizer, served twice over one cache at small batch limits."""
    from jaxllm.loading.default_model import default_gguf_path
    from jaxllm.loading.gguf_loader import load_gguf_tokenizer

    with tempfile.TemporaryDirectory(prefix="jaxllm-startup-") as d:
        tok_dir = Path(d) / "tok"
        load_gguf_tokenizer(default_gguf_path()).save_pretrained(str(tok_dir))
        folder = Path(d) / "ckpt"
        nbytes = write_checkpoint(folder, "tiny", tok_dir, shard_gb=0.0005)
        print(f"wrote {nbytes / 1e6:.1f} MB in {len(list(folder.glob('*.safetensors')))} shards")
        rows = serve_runs(folder, 2, Path(d) / "cache", [
            "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "64"])
    if out is not None:
        append_jsonl(out, rows)
    return 0 if all("error" not in r and r["exit_code"] == 0 for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON lines, appended")
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("write", help="a random HF checkpoint folder")
    w.add_argument("dir", type=Path)
    w.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    w.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder to copy in")
    w.add_argument("--shard-gb", type=float, default=5.0)
    s = sub.add_parser("serve", help="time to first served request, cold then restarts")
    s.add_argument("dir", type=Path)
    s.add_argument("--runs", type=int, default=2)
    s.add_argument("--cache-dir", type=Path, default=None,
                   help="the compilation cache (default: a temporary folder)")
    s.add_argument("--keep-cache", action="store_true", help="do not empty --cache-dir first")
    s.add_argument("--log-dir", type=Path, default=None, help="each server's log, kept")
    s.add_argument("--note", default="", help="a note for the rows (e.g. page cache warm)")
    a = p.parse_args(argv)
    if a.smoke:
        return _smoke(a.out)
    if a.command == "write":
        t = time.perf_counter()
        nbytes = write_checkpoint(a.dir, a.shape, a.tokenizer, a.shard_gb)
        print(f"wrote {a.dir}: {nbytes / 1e9:.2f} GB of {a.shape} weights in "
              f"{time.perf_counter() - t:.1f} s")
        return 0
    if a.command == "serve":
        if a.log_dir is not None:
            a.log_dir.mkdir(parents=True, exist_ok=True)
        rows = serve_runs(a.dir, a.runs, a.cache_dir, extra, a.keep_cache, a.log_dir)
        for r in rows:
            r["note"] = a.note
        if a.out is not None:
            append_jsonl(a.out, rows)
        return 0 if all("error" not in r and r["exit_code"] == 0 for r in rows) else 1
    p.error("a command (write, serve) or --smoke")
    return 2


if __name__ == "__main__":
    sys.exit(main())
