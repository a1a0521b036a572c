"""An L2 prefetch a Pallas (Triton) program can issue: Hopper's bulk prefetch, fire and forget.

``l2_prefetch(ref.at[rows, cols], live, nbytes)`` issues, for each lane of the index arrays,
``cp.async.bulk.prefetch.L2.global [address], nbytes`` (sm_90+): the copy engine reads those
bytes from DRAM into the L2 while the program goes on; nothing waits for it, nothing is
returned, and a program may exit with its prefetches still in flight. Lanes whose ``live`` is 0
issue nothing. Addresses must be 16-byte aligned and ``nbytes`` a multiple of 16.

Why (issue 6, batch-1 decode): the decode attention kernel reads ~4 MB of K/V a layer and is
bound by its latency (~7 µs of a layer's ~100), so the DRAM idles under it; its programs can
stream the next GEMM's weights into the L2 meanwhile (``ragged_paged_attention``'s
``l2_prefetch``).

Only for the GPU: it has no meaning in the interpreter (the caller leaves it out there), and no
discharge rule.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src import tree_util
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering
from jax._src.state import indexing
from jax._src.state import primitives as state_primitives
from jax._src.state import types as state_types

l2_prefetch_p = jax_core.Primitive("jaxllm_l2_prefetch")
l2_prefetch_p.multiple_results = True


def l2_prefetch(ref_view, live, nbytes: int) -> None:
    """Prefetch ``nbytes`` from each address ``ref_view`` (a ref indexed by equal-shaped int32
    index arrays, e.g. ``w.at[rows, zeros]``) picks, where ``live`` (int32, the same shape) is
    not 0. See the module docstring."""
    if not isinstance(nbytes, int) or nbytes < 16 or nbytes % 16:
        raise ValueError(f"nbytes must be a positive multiple of 16, got {nbytes!r}")
    ref, transforms = state_primitives.get_ref_and_transforms(ref_view, None, "l2_prefetch")
    if len(transforms) != 1 or not isinstance(transforms[0], indexing.NDIndexer):
        raise ValueError("l2_prefetch takes a ref indexed once by index arrays, e.g. "
                         f"w.at[rows, cols]; got {len(transforms)} transforms")
    want = tuple(transforms[0].get_indexer_shape())
    if tuple(jnp.shape(live)) != want:
        raise ValueError(f"live must have the indices' shape {want}, got {jnp.shape(live)}")
    args_flat, args_tree = tree_util.tree_flatten((ref, transforms, live))
    l2_prefetch_p.bind(*args_flat, args_tree=args_tree, nbytes=nbytes)


@l2_prefetch_p.def_effectful_abstract_eval
def _abstract_eval(*avals_flat, args_tree, nbytes):
    del avals_flat, args_tree, nbytes
    # A write effect on the ref (it writes nothing): a read effect alone lets jaxpr DCE drop
    # the call, which has no outputs.
    return [], {state_types.WriteEffect(0)}


@lowering.register_lowering(l2_prefetch_p)
def _lowering(ctx: lowering.LoweringRuleContext, *args_flat, args_tree, nbytes):
    block_info, *_ = ctx.block_infos
    ptr, indexers, live = args_tree.unflatten(args_flat)
    *_, live_aval = args_tree.unflatten(ctx.avals_in)
    (indexer,) = indexers  # l2_prefetch checked: one NDIndexer
    ptrs = lowering._compute_pointers_from_indices(ptr, block_info, indexer)
    live = lowering._ensure_ir_value(live, live_aval)
    shape = ir.RankedTensorType(ptrs.type).shape
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    addr = tt_dialect.ptr_to_int(ir.RankedTensorType.get(shape, i64), ptrs)
    asm = ("{ .reg .pred %p; setp.ne.b32 %p, $2, 0; "
           f"@%p cp.async.bulk.prefetch.L2.global [$1], {nbytes}; mov.u32 $0, 0; }}")
    # Not pure: the op has an effect (the prefetch) and its result is unused, so it must not be
    # dropped as dead code.
    tt_dialect.elementwise_inline_asm([ir.RankedTensorType.get(shape, i32)], asm, "=r,l,r",
                                      False, 1, [addr, live])
    return []


def prefetch_layout(nbytes_total: int, itemsize: int, programs: int, lanes: int
                    ) -> tuple[int, int, int]:
    """How ``programs`` programs of ``lanes`` lanes split an array of ``nbytes_total`` bytes
    (``itemsize`` a value) into prefetches: (chunk bytes, chunks, chunks a program). The chunk
    is a power of two of 16 bytes to 64 KB that divides the array, the smallest with which each
    program's lanes cover its share in one round where the array allows. ValueError if no
    16-byte multiple divides it, or if it holds 2^31 values or more."""
    if nbytes_total % 16 or nbytes_total <= 0:
        raise ValueError(f"an L2 prefetch needs a multiple of 16 bytes, got {nbytes_total}")
    if nbytes_total // itemsize >= 2 ** 31:  # the kernel's element offsets are int32
        raise ValueError(f"an L2 prefetch takes fewer than 2^31 elements, got "
                         f"{nbytes_total // itemsize}")
    need = -(-nbytes_total // (programs * lanes))
    chunk = 16
    while chunk < min(need, 65536) and nbytes_total % (2 * chunk) == 0:
        chunk *= 2
    chunks = nbytes_total // chunk
    return chunk, chunks, -(-chunks // programs)


def program_chunks(p, per: int, lanes: int, n_chunks: int) -> list[tuple]:
    """The chunks program ``p`` prefetches, a round of ``lanes`` at a time: [(chunk index,
    live)] (int32 arrays of ``lanes``; a dead lane's index is 0). Program p takes chunks
    [p * per, (p + 1) * per), those past ``n_chunks`` dead."""
    e = jnp.arange(lanes, dtype=jnp.int32)
    rounds = []
    for i in range(-(-per // lanes)):
        c = p * per + i * lanes + e
        live = (i * lanes + e < per) & (c < n_chunks)
        rounds.append((jnp.where(live, c, 0), live.astype(jnp.int32)))
    return rounds


def as_chunks(x, chunk_bytes: int):
    """``x`` viewed as [chunks, chunk_bytes / itemsize] (a reshape: no copy)."""
    per = chunk_bytes // jnp.dtype(x.dtype).itemsize
    return x.reshape(-1, per)
