"""Where the batch-1 step's host time goes: XLA's command-buffer updates per launch (issue 6's
fp8 batch-1 step is host-bound; docs/DESIGN_NOTES.md "Open performance gaps").

XLA re-records each command of a command buffer whose buffers moved since the last launch
(command_buffer_thunk.cc: ``updated_allocs``); this script says which moves and what they cost.
It builds latency.py's engine (8 sequence slots, random Llama-3-8B weights), puts one sequence
into decode at ``--context`` tokens, records that step's inputs, and times ``--calls`` launches
of each variant, back to back (no sync between calls):

  engine     engine.step(): scheduler, prepare, launch, fetch, detokenize (the real step)
  run        runner.run(inputs): pack + device_put + forward + sampler
  fwd_fresh  the forward alone, a fresh device_put of its input buffer each call
  fwd_same   the forward alone, the same input buffer and previous tokens every call
  fwd_prev   the forward alone, the same input buffer, the previous tokens a new array
  engine_pp  engine.step() with two executables of each step program used in turn ("ping-pong":
             the second compiled with a no-op compiler option, so it is a distinct executable
             with command buffers of its own). With async scheduling two steps are in flight,
             so the temp buffers alternate between two places; each executable then finds its
             own buffers where it left them and need not update its command buffers.

host_ms: median time the Python call took to return (the launch); wall_ms: total / calls after
the last result is ready. With ``TF_CPP_VMODULE=command_buffer_thunk=3`` (set by ``--vlog``)
XLA logs each update's ``updated_allocs`` and µs to stderr; phase markers are printed there
too, so ``--vlog`` runs can be summarized per variant (``summarize_vlog``).

    python3 benchmarks/gpu/cb_update.py --quantization fp8 --vlog 2> /tmp/vlog.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summarize_vlog(text: str) -> dict:
    """Per phase (the ``== phase NAME`` markers): number of command-buffer updates, their median
    ``updated_allocs`` and median µs (XLA's VLOG(3) lines)."""
    out, phase = {}, None
    allocs, micros = {}, {}
    for line in text.splitlines():
        m = re.search(r"== phase (\S+)", line)
        if m:
            phase = m.group(1)
            continue
        if phase is None:
            continue
        m = re.search(r"updated_allocs=(\d+)", line)
        if m:
            allocs.setdefault(phase, []).append(int(m.group(1)))
        m = re.search(r"Updated command buffer in (\d+)", line)
        if m:
            micros.setdefault(phase, []).append(int(m.group(1)))
    for p in set(allocs) | set(micros):
        a, u = allocs.get(p, []), micros.get(p, [])
        out[p] = dict(updates=len(u), allocs_median=statistics.median(a) if a else None,
                      us_median=statistics.median(u) if u else None, us_sum=sum(u))
    return out


def ping_pong(runner) -> None:
    """Patches ``runner.run`` to alternate between its programs and a second executable of each
    (the same program, compiled with a no-op compiler option)."""
    import functools

    import jax

    from jaxllm.engine import model_runner as mr

    opts = {**runner._jit_options.get("compiler_options", {}), "xla_cpu_enable_fast_math": False}
    fwd_alt = jax.jit(functools.partial(mr._forward, runner.graphdef, runner._treedef),
                      donate_argnums=(1,), compiler_options=opts)
    samp_alt = jax.jit(functools.partial(mr._sample_padded, runner.max_num_seqs),
                       static_argnums=(2, 3), compiler_options=opts)
    flip = [0]

    def run(inputs, nl, sort):
        fwd_in, samp_in = runner._device_inputs(inputs)
        T = inputs.token_ids.shape[0]
        alt = flip[0]
        flip[0] ^= 1
        fwd = fwd_alt if alt else runner.forward_for(T)
        samp = samp_alt if alt else runner._sample
        runner.kv_caches, logits = fwd(runner._leaves, runner.kv_caches, fwd_in,
                                       runner._prev_tokens)
        out, runner._prev_tokens = samp(logits, samp_in, nl, sort)
        return out

    runner.run = run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--vlog", action="store_true",
                   help="XLA's command_buffer_thunk VLOG(3) to stderr (updates per launch)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.vlog:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["TF_CPP_VMODULE"] = "command_buffer_thunk=3"

    import jax
    import numpy as np

    from offline_throughput import append_jsonl, random_model
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import SamplingParams

    loaded = random_model(args.shape, args.attention, quantization=args.quantization)
    cfg = EngineConfig(dtype="bfloat16", max_model_len=args.context + 8 * args.calls + 256,
                       max_num_seqs=8, max_num_batched_tokens=args.context + 64,
                       token_buckets=(8, args.context + 64), enable_prefix_caching=False,
                       quantization=args.quantization)
    engine = LLMEngine(cfg, loaded=loaded)
    runner = engine.runner
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=10 * args.calls + 64, ignore_eos=True,
                            detokenize=False)
    engine.add_request("r0", {"prompt_token_ids": rng.integers(
        0, loaded.model_config.vocab_size, args.context).tolist()}, params)
    for _ in range(4):
        engine.step()
    captured = []
    launch = runner.launch

    def recording_launch(inputs, nl, sort, next_ids=None):
        captured.append((inputs, nl, sort))
        return launch(inputs, nl, sort, next_ids)

    runner.launch = recording_launch
    engine.step()
    del runner.launch
    inputs, nl, sort = captured[-1]
    T = inputs.token_ids.shape[0]
    forward = runner.forward_for(T)
    fwd_in, _ = runner._device_inputs(inputs)
    prev_fixed = runner._prev_tokens

    def phase(name):
        print(f"== phase {name}", file=sys.stderr, flush=True)

    def timed(name, call):
        """host and wall per call of ``call()`` (returns what to block on)."""
        for _ in range(5):
            jax.block_until_ready(call())
        phase(name)
        hosts, last = [], None
        t0 = time.perf_counter()
        for _ in range(args.calls):
            t = time.perf_counter()
            last = call()
            hosts.append(time.perf_counter() - t)
        jax.block_until_ready(last)
        wall = (time.perf_counter() - t0) / args.calls
        phase(name + "-done")
        return dict(variant=name, host_ms=statistics.median(hosts) * 1e3, wall_ms=wall * 1e3)

    def engine_step():
        engine.step()
        return runner._prev_tokens

    def run():
        return runner.run(inputs, nl, sort).token_ids

    def fwd(fresh_in: bool, fresh_prev: bool):
        def call():
            buf = (runner._device_inputs(inputs)[0] if fresh_in else fwd_in)
            prev = (jax.device_put(np.zeros(prev_fixed.shape, np.int32)) if fresh_prev
                    else prev_fixed)
            runner.kv_caches, logits = forward(runner._leaves, runner.kv_caches, buf, prev)
            return logits
        return call

    rows = [timed("engine", engine_step), timed("run", run),
            timed("fwd_fresh", fwd(True, False)), timed("fwd_same", fwd(False, False)),
            timed("fwd_prev", fwd(False, True))]
    ping_pong(runner)
    rows += [timed("engine_pp", engine_step), timed("engine_pp2", engine_step)]
    for r in rows:
        r.update(quantization=args.quantization, context=args.context, T=T,
                 device=jax.devices()[0].device_kind, calls=args.calls)
        print(f"{r['variant']:10s} host {r['host_ms']:6.3f} ms  wall {r['wall_ms']:6.3f} ms",
              flush=True)
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "summarize":
        print(json.dumps(summarize_vlog(Path(sys.argv[2]).read_text()), indent=1))
        sys.exit(0)
    sys.exit(main())
