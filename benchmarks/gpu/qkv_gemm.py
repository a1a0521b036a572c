"""The batch-1 step's q/k/v GEMM in layer chains: what its form costs on the GPU.

At batch 1 (the 8-row decode bucket) the fused q/k/v projection of the Llama-3-8B shape (4096 ->
6144, 50.3 MB of bf16) is the loop's slowest weight reader: ~14.6 µs a layer (3.4 TB/s) where
the down GEMM reads at 4.1. The engine runs it as ``FusedLinear.split_k``: an einsum over
``parts`` slices of the input features (fp32 partials the decode kernel sums), with the input
RMSNorm's weight as the GEMM's prologue (``x * g``, the folded norm). Variants here:

- ``g`` (prologue) or not (what folding g into the weight at load time would give);
- parts 1 (XLA's own dot, bf16 output), 2, 4, 8;
- the weight stored [K, N] (the dense layout) or [N, K] (the fp8 layout).

Each variant runs as a chain of L layers in one jitted program (a distinct weight per layer, so
every layer reads from memory, not the L2): ``x = x + sum(partials)[:, :E]``. The glue (the sum
and the add) is the same kernel count in every variant; the figure is the GEMM's own GPU time
(the chain's longest op group, ``gpu_trace.per_call``'s ``top_op_us``) and the chain's GPU time,
each over L. Two rounds. Rows to ``--out`` (JSON lines).

    python3 benchmarks/gpu/qkv_gemm.py [--out FILE] [--rows 8] [--layers 12]
"""
import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import gpu_trace  # noqa: E402

E, N = 4096, 6144
PEAK_BW = 4.3e12


def step(parts: int, prologue: bool, layout: str):
    def f(x, g, w):
        h = x * g if prologue else x
        T = h.shape[0]
        if parts == 1:
            y = (jnp.dot(h, w) if layout == "kn" else jnp.dot(h, w.T)).astype(jnp.float32)
        else:
            hs = h.reshape(T, parts, E // parts)
            if layout == "kn":
                y = jnp.einsum("tpk,pkn->ptn", hs, w.reshape(parts, E // parts, N),
                               preferred_element_type=jnp.float32).sum(0)
            else:
                y = jnp.einsum("tpk,npk->ptn", hs, w.reshape(N, parts, E // parts),
                               preferred_element_type=jnp.float32).sum(0)
        return x + y[:, :E].astype(x.dtype)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="2 layers, 1 round (a CPU check)")
    a = ap.parse_args()
    if a.smoke:
        a.layers, a.repeats = 2, 1
    rows = []
    emit = gpu_trace.jsonl_emitter(rows, a.out)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (a.rows, E)).astype(jnp.bfloat16)
    g = (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (E,))).astype(jnp.bfloat16)
    ws = {"kn": [(0.02 * jax.random.normal(jax.random.PRNGKey(10 + i), (E, N))
                  ).astype(jnp.bfloat16) for i in range(a.layers)]}
    ws["nk"] = [w.T.copy() for w in ws["kn"]]
    wbytes = E * N * 2
    variants = [(p, pro, lay) for lay in ("kn", "nk") for pro in (True, False)
                for p in (4, 1, 2, 8)]
    ref = {pro: gpu_trace.layer_chain(step(1, pro, "kn"))(x, g, ws["kn"]).astype(jnp.float32)
           for pro in (True, False)}
    for rnd in range(1 if a.smoke else 2):
        for parts, pro, lay in variants:
            fn = gpu_trace.layer_chain(step(parts, pro, lay))
            out = fn(x, g, ws[lay]).astype(jnp.float32)
            rel = float(jnp.linalg.norm(out - ref[pro]) / jnp.linalg.norm(ref[pro]))
            dev = gpu_trace.device_time(fn, [(x, g, ws[lay])], calls=a.repeats)
            row = dict(variant=f"p{parts}{'_g' if pro else ''}_{lay}", parts=parts,
                       prologue=pro, layout=lay, M=a.rows, round=rnd, rel=rel)
            if dev is not None:
                gemm = dev["top_op_us"] / a.layers
                row.update(gemm_us=round(gemm, 2), chain_us=round(dev["device_us"] / a.layers, 2),
                           ops_per_layer=dev["ops_per_call"] / a.layers, top_op=dev["top_op"],
                           gemm_tb_s=round(wbytes / (gemm * 1e-6) / 1e12, 2))
            emit(row)
    print(f"\n| variant (parts, g prologue, layout) | GEMM µs / layer (rounds) | chain µs / layer "
          f"| ops / layer | GEMM TB/s | floor µs at {PEAK_BW / 1e12} TB/s |")
    print("|---|---|---|---:|---:|---:|")
    for (v,), rs in gpu_trace.rounds_by(rows, "variant").items():
        print(f"| {v} | {', '.join(str(r.get('gemm_us')) for r in rs)} | "
              f"{', '.join(str(r.get('chain_us')) for r in rs)} | {rs[-1].get('ops_per_layer')} | "
              f"{rs[-1].get('gemm_tb_s')} | {wbytes / PEAK_BW * 1e6:.2f} |")


if __name__ == "__main__":
    main()
