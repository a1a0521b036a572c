"""The decode kernel's L2 prefetch (pallas_kernels/l2_prefetch.py): how an array is split
among the programs, and its argument checks. The prefetch itself is a GPU instruction with no
result: its lowering is checked in tests/test_gpu_lowering.py, its run in tests/test_gpu.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.l2_prefetch import l2_prefetch, prefetch_layout, program_chunks


@pytest.mark.parametrize("nbytes,itemsize,programs,lanes", [
    (4096 * 4096, 1, 128, 128),       # Llama-3-8B's fp8 o weight, 8 heads x 16 splits
    (4096 * 4096 * 2, 2, 128, 128),   # its bf16 weight
    (4096 * 4096, 1, 8 * 8 * 5, 128),  # 8 slots x 8 heads x 5 splits: not a power of two
    (576 * 576 * 4, 4, 6, 128),        # a small float32 weight
    (48, 1, 3, 32),                    # fewer chunks than lanes
    (4096 * 4096, 1, 1, 32),           # one program: several rounds
])
def test_every_chunk_of_the_array_is_prefetched_by_exactly_one_lane(nbytes, itemsize, programs,
                                                                     lanes):
    chunk, n_chunks, per = prefetch_layout(nbytes, itemsize, programs, lanes)
    assert chunk >= 16 and chunk & (chunk - 1) == 0 and chunk % itemsize == 0
    assert n_chunks * chunk == nbytes and chunk <= 65536
    seen = np.zeros(n_chunks, np.int64)
    for p in range(programs):
        for c, live in program_chunks(p, per, lanes, n_chunks):
            c, live = np.asarray(c), np.asarray(live).astype(bool)
            assert c.shape == live.shape == (lanes,) and (c[~live] == 0).all()
            np.add.at(seen, c[live], 1)
    assert (seen == 1).all()
    # One round a program where the chunk size allows it (the 64 KB cap, or an array whose
    # size a larger chunk does not divide, can ask more).
    if nbytes // (programs * lanes) <= 65536 and nbytes % (programs * lanes * 16) == 0:
        assert per <= lanes


def test_bad_sizes_and_bad_indexing_are_refused():
    from jax.experimental import pallas as pl

    with pytest.raises(ValueError, match="multiple of 16"):
        prefetch_layout(4100, 1, 4, 32)
    with pytest.raises(ValueError, match="2\\^31"):
        prefetch_layout(2 ** 31, 1, 4, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        l2_prefetch(None, None, 24)

    def trace(body):  # the kernel traced (interpret: the CPU) with a [64, 64] fp8 ref
        call = pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                              interpret=True)
        return jax.make_jaxpr(call)(jnp.ones((64, 64), jnp.float8_e4m3fn))

    rows = jnp.arange(8, dtype=jnp.int32)
    with pytest.raises(ValueError, match="indexed once"):
        trace(lambda w_ref, o_ref: l2_prefetch(w_ref, jnp.ones(8, jnp.int32), 64))
    with pytest.raises(ValueError, match="indices' shape"):
        trace(lambda w_ref, o_ref: l2_prefetch(w_ref.at[rows, rows * 0], jnp.ones(4, jnp.int32),
                                               64))


def test_decode_kernel_refuses_an_unknown_prefetch_place_and_the_interpreter_ignores_it():
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention

    T, S, M, B, H, K, D = 4, 4, 4, 8, 8, 2, 32
    rng = np.random.default_rng(3)
    kp = jnp.asarray(rng.standard_normal((S * M + 1, B, K, D)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((S * M + 1, B, K, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((T, H, D)), jnp.float32)
    sl = jnp.asarray([20, 9, 0, 0], jnp.int32)
    pt = jnp.arange(S * M, dtype=jnp.int32).reshape(S, M)
    qsl = jnp.asarray([0, 1, 2, 2, 2], jnp.int32)
    ns = jnp.asarray(2, jnp.int32)
    w = jnp.ones((64, 64), jnp.float8_e4m3fn)
    attend = functools.partial(ragged_paged_attention, sm_scale=0.2, decode_only=True,
                               interpret=True)
    with pytest.raises(ValueError, match="l2_prefetch_at"):
        attend(q, kp, vp, sl, pt, qsl, ns, l2_prefetch=w, l2_prefetch_at="middle")
    want = jax.jit(attend)(q, kp, vp, sl, pt, qsl, ns)
    got = jax.jit(attend)(q, kp, vp, sl, pt, qsl, ns, l2_prefetch=w)
    np.testing.assert_array_equal(np.asarray(got[:2]), np.asarray(want[:2]))
