"""GPU time read back from a ``jax.profiler`` Perfetto trace (profile_step.py, kernels.py).

Host wall time of a small kernel call carries the host's dispatch (~30-70 us a call on the
GPU machine), which hides the kernel at small shapes even when the calls are batched into one
jitted program. The profiler records every GPU op with its own start and duration (CUPTI), so
the device time of a call is the union of its ops' intervals, without the gaps in which the GPU
waits for the host. Under the profiler XLA runs op by op (it turns command buffers off), which
changes launch overheads, not the ops' durations.

Imports only jax (for ``device_time``); the readers are plain json.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path


def gpu_events(trace_path: Path) -> tuple[list[tuple[str, float, float]], set[str]]:
    """(name, start_us, dur_us) of the GPU stream events of a Perfetto/Chrome trace, and the
    names of the GPU threads seen (streams, plus derived lines like "XLA Ops" that repeat them)."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, v in threads.items() if v.lower().startswith("stream")}
    keep = streams or set(threads)
    out = [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
           if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in keep]
    return out, set(threads.values())


def host_top(trace_path: Path, num_steps: int, top: int) -> list[tuple[str, float, float]]:
    """(name, ms per step, calls per step) of the host-side trace events (every process that is
    not a GPU), the longest first: where the host's part of a step goes (XLA's executable
    launch, command-buffer updates, Python). Nested events each count their whole span."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu_pids:
            name = op_group(str(e.get("name", "")))[:100]
            total[name] += float(e.get("dur", 0.0))
            calls[name] += 1
    return [(k, v / num_steps / 1e3, calls[k] / num_steps) for k, v in total.most_common(top)]


def op_group(name: str) -> str:
    """An op's name with its digits replaced by '#': the instances of one kernel group together
    (fusion_12 and fusion_40; a Pallas kernel's block sizes are in its name, and go too)."""
    return re.sub(r"\d+", "#", name)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace_path: Path, num_steps: int, top: int) -> dict:
    """Per-step GPU busy time (union of stream events), op count and the top ops by time."""
    events, thread_names = gpu_events(trace_path)
    if not events:
        raise RuntimeError(f"no GPU events in {trace_path}; GPU threads seen: {sorted(thread_names)}")
    by_name, calls = collections.Counter(), collections.Counter()
    for name, _, d in events:
        by_name[op_group(name)] += d
        calls[op_group(name)] += 1
    busy = union_us([(s, s + d) for _, s, d in events])
    ranked = by_name.most_common(top)
    return dict(gpu_busy_ms=busy / num_steps / 1e3, kernels_per_step=len(events) / num_steps,
                gpu_threads=sorted(thread_names),
                top=[(k, v / num_steps / 1e3) for k, v in ranked],
                top_calls={k: calls[k] / num_steps for k, _ in ranked})


def layer_sites(events: list[tuple[str, float, float]], anchor: str = "ragged_paged_attention"
                ) -> list[tuple[int, str, float, int]]:
    """The ops of one decoder layer by their place around the layer's attention call: (offset
    from the attention op, the op group most often there, its mean µs, how many layers agreed).

    The GPU events in start order are cut at each op whose group contains ``anchor`` (one a
    layer); the windows of the most common length (a layer's ops; the windows that take in the
    embedding, logits or sampler differ and are left out) are lined up op by op. This tells the
    projections apart where they share a kernel name (XLA's ``gemm_fusion_dot_#``, every Mosaic
    GPU kernel's ``kernel_mosaic_gpu_kernel``), which the per-name totals of ``summarize`` can
    not."""
    evs = sorted(events, key=lambda e: e[1])
    marks = [i for i, (n, _, _) in enumerate(evs) if anchor in n]
    wins = [evs[a:b] for a, b in zip(marks, marks[1:])]
    if not wins:
        return []
    length = collections.Counter(len(w) for w in wins).most_common(1)[0][0]
    wins = [w for w in wins if len(w) == length]
    out = []
    for j in range(length):
        groups = collections.Counter(op_group(w[j][0]) for w in wins)
        name, n = groups.most_common(1)[0]
        us = [w[j][2] for w in wins if op_group(w[j][0]) == name]
        out.append((j, name, sum(us) / len(us), n))
    return out


def per_call(events: list[tuple[str, float, float]], calls: int) -> dict | None:
    """Device time of one call from the GPU events of ``calls`` calls: ``device_us`` (GPU busy,
    the union of the ops' intervals), ``ops_per_call``, and the op group that took longest
    (``top_op``, ``top_op_us``: e.g. the Pallas kernel itself, without the jnp glue around it).
    None without events (no GPU in the trace)."""
    if not events or calls < 1:
        return None
    by_name = collections.Counter()
    for name, _, d in events:
        by_name[op_group(name)] += d
    top_name, top_us = by_name.most_common(1)[0]
    return dict(device_us=union_us([(s, s + d) for _, s, d in events]) / calls,
                ops_per_call=len(events) / calls, top_op=top_name, top_op_us=top_us / calls)


def trace_events(fn, arg_sets: list[tuple], calls: int = 20
                 ) -> list[tuple[str, float, float]] | None:
    """``gpu_events`` of ``calls`` calls of ``fn`` (``arg_sets`` cycled, as the wall-time loop
    does) under the profiler, after one warm call. None when no trace was written."""
    import jax

    jax.block_until_ready(fn(*arg_sets[0]))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            out = None
            for i in range(calls):
                out = fn(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(out)
        trace = next(Path(d).rglob("perfetto_trace.json.gz"), None)
        if trace is None:
            return None
        events, _ = gpu_events(trace)
    return events


def device_time(fn, arg_sets: list[tuple], calls: int = 20) -> dict | None:
    """``per_call`` of ``fn`` over ``calls`` profiled calls (``trace_events``). None on a
    platform whose trace has no GPU ops."""
    events = trace_events(fn, arg_sets, calls)
    return None if events is None else per_call(events, calls)


def layer_chain(step):
    """``jit(run)`` with ``run(x, c, ws)``: ``x = step(x, c, w)`` for each w in ``ws`` (a layer
    chain: a distinct weight per layer, so each reads from memory, not the L2, as a step's
    layers do under command buffers); ``c`` is what every layer shares."""
    import jax

    def run(x, c, ws):
        for w in ws:
            x = step(x, c, w)
        return x
    return jax.jit(run)


def jsonl_emitter(rows: list, out: str | None):
    """``emit(row)`` for a benchmark script: keeps the row in ``rows``, prints it as JSON and
    appends it to the JSON-lines file ``out`` (if given)."""
    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return emit


def lower_for_h100(row: dict, fn, *args, error_chars: int = 600) -> bool:
    """Lowers the jitted ``fn`` at ``args`` (ShapeDtypeStructs) for an abstract H100 (132
    SMs), with no GPU present: the ``--smoke`` check of the Mosaic GPU benchmarks, whose
    interpreter runs neither semaphores nor TMA reductions. Sets ``row["lowered"]`` (and
    ``row["error"]``, its first ``error_chars``) and returns it."""
    import jax  # noqa: PLC0415
    from jax.sharding import AbstractDevice, AbstractMesh  # noqa: PLC0415

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
            fn.trace(*args).lower(lowering_platforms=("cuda",))
        row["lowered"] = True
    except Exception as e:  # a form Mosaic refuses: the row says why
        row.update(lowered=False, error=f"{type(e).__name__}: {str(e)[:error_chars]}")
    return row["lowered"]


def rounds_by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """A benchmark's timed rows (those with a "variant") grouped by ``keys``, in first-seen
    order, each group's rows (its rounds) in order: for the summary table."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if "variant" in r:
            out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
