"""The loader's safetensors reader: views of the memory-mapped files."""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jaxllm.loading.safetensors_loader import iter_safetensors, mapped_tensors
from jaxllm.loading.weights import LazyTensor


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


def _write_raw(path, header, data: bytes) -> None:
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
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ValueError, match="runs past"):
        list(mapped_tensors(p))
    _write_raw(p, [1, 2], b"")
    with pytest.raises(ValueError, match="not a JSON object"):
        list(mapped_tensors(p))
    _write_raw(p, {"m": {"dtype": "F32", "shape": [2]}}, bytes(8))
    with pytest.raises(ValueError, match="'m' has a malformed header entry"):
        list(mapped_tensors(p))
    _write_raw(p, {"n": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ValueError, match="'n'.*truncated or corrupt"):
        list(mapped_tensors(p))



def test_prefetch_copies_narrow_floats_ahead_in_file_order(mixed_file):
    # What the loader copies to the device beside the config's read: floating tensors no
    # wider than the model dtype (bf16 and float8 included), not the skipped names; the rest
    # stay views for the loader's own path. Everything comes back in the file's order.
    import jax

    from jaxllm.loading.safetensors_loader import _DevicePrefetch

    views = list(mapped_tensors(mixed_file))
    prefetch = _DevicePrefetch([mixed_file], ml_dtypes.bfloat16, skip=("c.f16",))
    got = list(prefetch.tensors())
    assert [n for n, _ in got] == [n for n, _ in views]
    ahead = {n for n, t in got if isinstance(t, jax.Array)}
    assert ahead == {"a.bf16", "d.e4m3"}
    assert prefetch.copied_bytes == sum(v.nbytes for n, v in views if n in ahead)
    for (name, t), (_, v) in zip(got, views):
        assert t.dtype == v.dtype and t.shape == v.shape, name
        np.testing.assert_array_equal(np.asarray(t).reshape(-1).view(np.uint8),
                                      v.reshape(-1).view(np.uint8))
    assert list(prefetch.tensors()) == []  # each handed over once (its param replaces it)


def test_prefetch_errors_reach_the_caller_and_cancel_stops_it(mixed_file, tmp_path):
    from jaxllm.loading.safetensors_loader import _DevicePrefetch

    bad = tmp_path / "bad.safetensors"
    _write_raw(bad, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16)
    prefetch = _DevicePrefetch([mixed_file, bad], np.float32)
    with pytest.raises(ValueError, match="'w'.*truncated or corrupt"):
        list(prefetch.tensors())
    prefetch = _DevicePrefetch([mixed_file], np.float32)
    prefetch.cancel()
    assert not prefetch._thread.is_alive() and list(prefetch.tensors()) == []


def test_prefetch_runs_when_the_checkpoint_is_in_the_page_cache(mixed_file, monkeypatch):
    # From a cold disk the copies would compete with transformers' import for the disk: the
    # loader copies ahead only when the files' pages are cached (or when told to).
    from jaxllm.loading import safetensors_loader as sl

    monkeypatch.delenv("JAXLLM_LOAD_PREFETCH", raising=False)
    assert sl.resident_fraction([mixed_file]) >= 0.9  # written moments ago
    assert sl._prefetch_wanted([mixed_file])
    monkeypatch.setattr(sl, "resident_fraction", lambda files: 0.5)
    assert not sl._prefetch_wanted([mixed_file])
    monkeypatch.setenv("JAXLLM_LOAD_PREFETCH", "1")
    assert sl._prefetch_wanted([mixed_file])
    monkeypatch.setenv("JAXLLM_LOAD_PREFETCH", "0")
    monkeypatch.setattr(sl, "resident_fraction", lambda files: 1.0)
    assert not sl._prefetch_wanted([mixed_file])
    monkeypatch.setenv("JAXLLM_LOAD_PREFETCH", "yes")
    with pytest.raises(ValueError, match="JAXLLM_LOAD_PREFETCH='yes'"):
        sl._prefetch_wanted([mixed_file])
