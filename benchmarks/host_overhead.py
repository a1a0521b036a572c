"""Host work of one engine step in steady decode, split by part (issue 9: GPU idle per step).

Builds LLMEngine on random weights (default: the "tiny" shape, so it runs on a CPU; on a GPU box
``--shape llama3-8b``), puts ``--batch`` sequences into decode at ``--context`` tokens, then
times ``LLMEngine.step()`` piece by piece, median over ``--steps`` steps:

  schedule        Scheduler.schedule()
  sampling_rows   LLMEngine._dispatch minus runner.dispatch and commit: the per-row
                  SamplingRows, prompt-logprob ids, the penalty check
  prepare_batch   ModelRunner.prepare minus the sampling tensors: token ids, positions, page
                  table, slot mapping, ...
  sampling_tens   sampler.build_sampling_tensors
  runner_other    ModelRunner.dispatch minus prepare and launch (logprobs width, sort choice)
  pack            packing the StepInputs into the two int32 buffers
  device_put      the one host->device copy of the buffers
  jit_dispatch    the forward's and the sampler's jitted calls (dispatch only)
  commit          Scheduler.commit (placeholders)
  fetch           runner.fetch of the previous step's results, after they are ready
  read_rows       LLMEngine._read_inflight minus fetch: per-row resolve, stop checks, outputs
  step_other      the rest of LLMEngine.step
  host_total      the sum: the host time of one step

Each part is timed by wrapping the method in this script (the engine has no timers). To keep the
device's work out of the host figures, the wrapper around ``ModelRunner.launch`` blocks until
the step's results are ready and that wait is not counted (on a CPU the "device" is the same
cores, so otherwise it would inflate every host part). ``wall_step`` is measured separately,
without any wrapper: the real step time (on a GPU, with the host overlapping the device).
A cProfile of ``--profile-steps`` steps (launch still blocked) lists the top host functions.
``--clock thread`` times the parts in the main thread's CPU time instead of wall time: on a
shared box other processes' load no longer inflates them (work the step leaves to other
threads, in jit_dispatch / device_put / fetch, is then not counted).

Sequences enter decode without running their prefill by default (their pages are allocated
and their prompt marked computed, so the K/V is zeros): the host work of a decode step does not
depend on the cache's contents, and a real prefill of 256 x 1k tokens is slow on a CPU.
``--real-prefill`` runs it (GPU). ``tokens_hash`` digests every generated token id, so two
versions of the engine can be checked to produce the same tokens on the same run.

    python3 benchmarks/host_overhead.py                       # CPU, tiny model, batch 256
    python3 benchmarks/host_overhead.py --shape llama3-8b --batch 256 --real-prefill   # GPU
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, random_model  # noqa: E402

# The clock of the parts (--clock): perf_counter, or the main thread's CPU time, which a busy
# shared box does not inflate (time spent descheduled while other processes run is not counted).
_CLOCK = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter

PARTS = ("schedule", "sampling_rows", "prepare_batch", "sampling_tens", "runner_other", "pack",
         "device_put", "jit_dispatch", "commit", "fetch", "read_rows", "step_other")


class _Timers:
    """Wraps methods / module functions with timers (``_clock``) summed into ``self.now``."""

    def __init__(self):
        self.now: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, key: str, after=None) -> None:
        orig = getattr(owner, attr)
        now = self.now

        def timed(*a, **kw):
            t = _clock()
            r = orig(*a, **kw)
            now[key] = now.get(key, 0.0) + _clock() - t
            if after is not None:
                after(r)
            return r

        self._undo.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, timed)

    def unwrap(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            if orig is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, orig)
        self._undo.clear()


_MISSING = object()


def _block_after_launch(timers: _Timers):
    import jax

    def wait(result):
        t = _clock()
        jax.block_until_ready(result)
        timers.now["device_wait"] = timers.now.get("device_wait", 0.0) + _clock() - t
    return wait


def _instrument(engine, timers: _Timers, parts: bool = True) -> None:
    from jaxllm.engine import model_runner as mr
    from jaxllm.engine import sampler as sampler_lib

    runner = engine.runner
    timers.wrap(runner, "launch", "launch", after=_block_after_launch(timers))
    if not parts:
        return
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine, "_dispatch", "dispatch_total")
    timers.wrap(runner, "dispatch", "runner_dispatch")
    timers.wrap(runner, "prepare", "prepare")
    timers.wrap(sampler_lib, "build_sampling_tensors", "sampling_tens")
    timers.wrap(runner, "_device_inputs", "device_inputs")
    timers.wrap(mr, "pack", "pack")
    timers.wrap(engine.scheduler, "commit", "commit")
    timers.wrap(engine, "_read_inflight", "read_total")
    timers.wrap(runner, "fetch", "fetch")


def _parts(t: dict[str, float], step: float) -> dict[str, float]:
    g = lambda k: t.get(k, 0.0)  # noqa: E731
    launch = g("launch")  # without the device wait (the wrapper adds it after timing)
    p = dict(
        schedule=g("schedule"),
        sampling_rows=g("dispatch_total") - g("runner_dispatch") - g("commit"),
        prepare_batch=g("prepare") - g("sampling_tens"),
        sampling_tens=g("sampling_tens"),
        runner_other=g("runner_dispatch") - g("prepare") - launch - g("device_wait"),
        pack=g("pack"),
        device_put=g("device_inputs") - g("pack"),
        jit_dispatch=launch - g("device_inputs"),
        commit=g("commit"),
        fetch=g("fetch"),
        read_rows=g("read_total") - g("fetch"),
    )
    host = step - g("device_wait")
    p["step_other"] = host - sum(p.values())
    p["host_total"] = host
    p["device_wait"] = g("device_wait")
    return p


def _enter_decode_without_prefill(engine) -> None:
    """Moves every waiting sequence to running with its prompt (but the last token) marked
    computed on freshly allocated pages: the next step is its decode step."""
    from jaxllm.engine.sequence import SequenceStatus

    sch = engine.scheduler
    while sch.waiting:
        seq = sch.waiting.popleft()
        n = seq.num_tokens - 1
        seq.page_ids = list(engine.page_pool.allocate(math.ceil(n / sch.page_size)))
        seq.num_computed_tokens = n
        seq.status = SequenceStatus.RUNNING
        sch.running.append(seq)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override the shape's vocab (default: 4096 for tiny, the shape's otherwise)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the engine's max_num_seqs (default: --batch); e.g. batch 1 in an "
                        "engine built for 256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=10, help="0: no cProfile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sampling", default="mixed", choices=["greedy", "temperature", "mixed"],
                   help="mixed: even rows greedy, odd rows temperature 0.8")
    p.add_argument("--output-kind", default="cumulative",
                   choices=["cumulative", "delta", "final_only"],
                   help="cumulative: SamplingParams' default (what profile_step.py runs)")
    p.add_argument("--attention", default=None, choices=["reference", "pallas"],
                   help="default: reference on CPU, pallas otherwise")
    p.add_argument("--real-prefill", action="store_true",
                   help="run the prompts' prefill instead of marking them computed")
    p.add_argument("--sync", action="store_true", help="async_scheduling=False")
    p.add_argument("--clock", default="wall", choices=sorted(_CLOCK),
                   help="the parts' clock: wall (perf_counter) or thread (the main thread's CPU "
                        "time: steadier on a shared box; jit_dispatch / device_put / fetch then "
                        "leave out work of other threads). wall_step is always wall time")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line")
    args = p.parse_args(argv)
    global _clock
    _clock = _CLOCK[args.clock]

    import jax
    import numpy as np

    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import RequestOutputKind, SamplingParams

    on_cpu = jax.default_backend() == "cpu"
    attention = args.attention or ("reference" if on_cpu else "pallas")
    vocab = args.vocab_size or (4096 if args.shape == "tiny" else None)
    loaded = random_model(args.shape, attention, vocab_size=vocab)
    mc = loaded.model_config
    total_steps = args.warmup + 2 * args.steps + args.profile_steps + 8
    max_model_len = args.context + total_steps + 16
    max_seqs = args.max_num_seqs or args.batch
    if max_seqs < args.batch:
        raise SystemExit(f"--max-num-seqs {max_seqs} < --batch {args.batch}")
    mnbt = max(max_seqs, 2048 if args.real_prefill else max_seqs)
    buckets = tuple(sorted({args.batch, max_seqs, mnbt}))
    cfg = EngineConfig(dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=max_seqs,
                       max_num_batched_tokens=mnbt, token_buckets=buckets,
                       enable_prefix_caching=False, async_scheduling=not args.sync)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, loaded=loaded)
    print(f"engine built in {time.perf_counter() - t0:.1f} s on {jax.devices()[0].device_kind}; "
          f"{args.shape} V={mc.vocab_size}, batch {args.batch}, context {args.context}",
          flush=True)

    rng = np.random.default_rng(0)
    kind = {"cumulative": RequestOutputKind.CUMULATIVE, "delta": RequestOutputKind.DELTA,
            "final_only": RequestOutputKind.FINAL_ONLY}[args.output_kind]
    for i in range(args.batch):
        greedy = args.sampling == "greedy" or (args.sampling == "mixed" and i % 2 == 0)
        params = SamplingParams(temperature=0.0 if greedy else 0.8, seed=None if greedy else i,
                                max_tokens=total_steps + 4, ignore_eos=True, detokenize=False,
                                output_kind=kind)
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(
            0, mc.vocab_size, args.context).tolist()}, params)
    seqs = [s for r in engine._requests.values() for s in r.seqs]
    if args.real_prefill:
        while engine.scheduler.num_waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens - 1 for s in engine.scheduler.running):
            engine.step()
    else:
        _enter_decode_without_prefill(engine)
    for _ in range(args.warmup):
        engine.step()

    # 1. The step as it runs (no wrappers): wall time per step.
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    jax.block_until_ready(engine.runner._prev_tokens)

    # 2. Part by part, the device's time excluded.
    timers = _Timers()
    _instrument(engine, timers)
    rows = []
    for _ in range(args.steps):
        timers.now.clear()
        t = _clock()
        engine.step()
        rows.append(_parts(timers.now, _clock() - t))
        assert len(engine.scheduler.running) == args.batch
    timers.unwrap()

    # 3. cProfile of the host functions (launch blocked, as above).
    prof_text = ""
    if args.profile_steps:
        _instrument(engine, timers, parts=False)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile_steps):
            engine.step()
        prof.disable()
        timers.unwrap()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime").print_stats(args.top)
        prof_text = s.getvalue()

    while engine.has_unfinished_requests():  # to the end: every token resolved
        engine.step()
    if os.environ.get("HOST_OVERHEAD_DUMP"):
        np.save(os.environ["HOST_OVERHEAD_DUMP"], np.array([s.output_token_ids for s in seqs]))
    digest = hashlib.sha256()
    for seq in seqs:
        digest.update(np.asarray(seq.output_token_ids, np.int64).tobytes())

    med = {k: statistics.median(r[k] for r in rows) * 1e3 for k in rows[0]}
    wall_ms = statistics.median(walls) * 1e3
    print(f"\nhost time per step, median of {args.steps} steps (ms); batch {args.batch}, "
          f"sampling {args.sampling}, output {args.output_kind}, clock {args.clock}")
    for k in PARTS + ("host_total",):
        print(f"  {k:<14} {med[k]:8.3f}")
    print(f"  {'(device wait)':<14} {med['device_wait']:8.3f}   excluded above")
    print(f"  {'wall_step':<14} {wall_ms:8.3f}   uninstrumented engine.step()")
    print(f"tokens_hash {digest.hexdigest()[:16]}")
    if prof_text:
        print(f"\ncProfile, {args.profile_steps} steps, by own time:")
        print("\n".join(prof_text.splitlines()[:args.top + 12]))
    if args.out:
        row = dict(shape=args.shape, device=jax.devices()[0].device_kind, batch=args.batch,
                   context=args.context, sampling=args.sampling, output_kind=args.output_kind,
                   clock=args.clock,
                   steps=args.steps, wall_step_ms=wall_ms, tokens_hash=digest.hexdigest(),
                   **{f"{k}_ms": v for k, v in med.items()})
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
