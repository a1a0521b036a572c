"""The loader's safetensors reader (views of the memory-mapped files) and its threaded copies."""
from __future__ import annotations

import json
import struct
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jaxllm.loading.safetensors_loader import iter_safetensors, mapped_tensors
from jaxllm.loading.weights import LazyTensor, Transfers


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    # Every dtype a checkpoint carries, odd shapes, a scalar and an empty tensor, so the views'
    # offsets are checked at unaligned byte positions too.
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(3, 1, 9, generator=g),
        "c.f16": torch.randn(11, generator=g).to(torch.float16),
        "d.e4m3": (torch.randn(6, 4, generator=g) * 50).to(torch.float8_e4m3fn),
        "e.i64": torch.arange(13, dtype=torch.int64),
        "f.u8": torch.arange(3, dtype=torch.uint8),
        "g.scalar": torch.tensor(0.25),
        "h.empty": torch.zeros(0, 4),
        "i.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path_factory.mktemp("st") / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_views_equal_safetensors_own_reader(mixed_file):
    views = dict(mapped_tensors(mixed_file))
    with safe_open(str(mixed_file), framework="pt") as f:
        assert sorted(views) == sorted(f.keys())
        for name, view in views.items():
            ref = f.get_tensor(name)
            assert view.shape == tuple(ref.shape), name
            want = {torch.bfloat16: ml_dtypes.bfloat16,
                    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}.get(ref.dtype)
            if want is not None:  # numpy has no such dtype: compare the bit patterns
                assert view.dtype == want, name
                np.testing.assert_array_equal(view.view(np.uint8).reshape(-1),
                                              ref.reshape(-1).view(torch.uint8).numpy())
            else:
                np.testing.assert_array_equal(view, ref.numpy(), err_msg=name)
            assert not view.flags.writeable  # a read-only map: nothing writes the file


def test_iter_safetensors_yields_lazy_blocks_that_outlive_the_iterator(mixed_file):
    items = list(iter_safetensors([mixed_file], lazy=True))  # iterator exhausted first
    lazy = dict(items)["b.f32"]
    assert isinstance(lazy, LazyTensor) and lazy.shape == (3, 1, 9)
    with safe_open(str(mixed_file), framework="numpy") as f:
        np.testing.assert_array_equal(lazy[1:, :, 2:5], f.get_tensor("b.f32")[1:, :, 2:5])


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_bad_files_raise_naming_the_tensor(tmp_path):
    p = tmp_path / "bad.safetensors"
    _write_raw(p, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(32))
    with pytest.raises(ValueError, match="'w'.*truncated or corrupt"):
        list(mapped_tensors(p))
    _write_raw(p, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}, bytes(64))
    with pytest.raises(ValueError, match="'w'.*truncated or corrupt"):
        list(mapped_tensors(p))
    _write_raw(p, {"z": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ValueError, match="'z' has dtype 'C64'"):
        list(mapped_tensors(p))
    p.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        list(mapped_tensors(p))
    p.write_bytes(struct.pack("<Q", 3) + b"\xff{}")
    with pytest.raises(ValueError, match="header is not JSON"):
        list(mapped_tensors(p))


def test_transfers_finish_in_order_and_bound_what_waits():
    # Copies on 3 threads: every array lands under its key, finished on the caller's thread in
    # the order put, with never more than max_bytes (but at least one array) waiting.
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((n, 64)).astype(np.float32) for n in (8, 200, 3, 64, 1, 90)]
    order, caller = [], threading.get_ident()

    def finish(i):
        def f(x):
            assert threading.get_ident() == caller
            order.append(i)
            return x * 2
        return f

    with Transfers(3, max_bytes=100 * 64 * 4) as t:
        for i, a in enumerate(arrays):
            t.put(i, a, finish(i))
            assert t._bytes <= 100 * 64 * 4 or len(t._pending) == 1
        done = t.drain()
    assert order == list(range(len(arrays)))
    for i, a in enumerate(arrays):
        assert isinstance(done[i], jax.Array)
        np.testing.assert_array_equal(np.asarray(done[i]), a * 2)


def test_transfers_raise_a_copys_error_and_run_inline_without_threads():
    with pytest.raises(ValueError, match="boom"):
        with Transfers(2) as t:
            t.put("a", np.ones(4), lambda x: x)
            t.put("b", np.ones(4), lambda x: (_ for _ in ()).throw(ValueError("boom")))
            t.drain()
    t = Transfers(0)
    t.put("k", np.arange(3), lambda x: x + 1)
    assert not t._pending and np.asarray(t.done["k"]).tolist() == [1, 2, 3]


def test_readahead_advises_the_file_in_order_a_window_ahead(tmp_path, monkeypatch):
    # Each tensor yielded asks the kernel for the bytes up to `readahead` past its start, page
    # aligned, each byte once: by the last tensor the whole file from the first tensor on.
    import mmap

    from jaxllm.loading import safetensors_loader as st

    calls = []

    class Spy(mmap.mmap):
        def madvise(self, option, start=0, length=None):
            calls.append((option, start, length))
            return super().madvise(option, start, length)
    monkeypatch.setattr(st.mmap, "mmap", Spy)
    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.full((1000 + i,), float(i)) for i in range(6)}, str(path))
    page, ahead = mmap.PAGESIZE, 2 * mmap.PAGESIZE
    seen = []
    for name, view in st.mapped_tensors(path, readahead=ahead):
        seen.append(name)
        assert float(view[0]) == int(name[1:])
    assert seen == [f"t{i}" for i in range(6)]  # the order of their bytes
    assert calls and all(c[0] == mmap.MADV_WILLNEED and c[1] % page == 0 for c in calls)
    for (_, s0, n0), (_, s1, _) in zip(calls, calls[1:]):
        assert s1 >= s0 + n0 - page  # forward, never re-advising more than a page
    assert calls[-1][1] + calls[-1][2] == path.stat().st_size
    calls.clear()
    list(st.mapped_tensors(path))  # readahead 0: no advice
    assert not calls
