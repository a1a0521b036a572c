"""benchmarks/startup.py: the time-to-first-served-request benchmark, run on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_startup_smoke_serves_a_written_checkpoint_cold_then_warm(tmp_path):
    # A sharded random checkpoint written, served by `jaxllm serve` twice over one compilation
    # cache: both processes answer their first completion, log every start-up phase the
    # benchmark reads, and exit 0 on SIGTERM.
    out = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup.py"), "--smoke",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "shards" in r.stdout and "in 1 shards" not in r.stdout, r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["cache"] for row in rows] == ["cold", "warm"]
    for row in rows:
        assert "error" not in row, row
        assert row["exit_code"] == 0 and row["completion_tokens"] == 8
        assert row["programs"] > 0 and row["pages"] > 0
        assert 0 < row["load_s"] < row["ready_s"] <= row["health_s"] <= row["first_s"]
        # (each logged to 0.1 s: the three rounded parts may overshoot the rounded whole)
        assert row["config_s"] + row["weights_s"] + row["tokenizer_s"] <= row["load_s"] + 0.2
        assert row["compile_s"] < row["ready_s"]


def test_parse_startup_log_reads_the_engine_and_server_lines():
    from startup import parse_startup_log

    log = ("INFO jaxllm: read config.json in 3.5 s; placed 16.06 GB of weights from 4 files in "
           "2.4 s (15.80 GB of them copied on a thread beside the config's read)\n"
           "INFO jaxllm: loaded the tokenizer in 0.6 s\n"
           "INFO jaxllm: loaded my-model in 12.5 s\n"
           "INFO jaxllm: fused q/k/v and gate/up projections in 0.7 s\n"
           "INFO jaxllm: device memory before the KV pool: arrays 14.96 GiB, allocator in use "
           "15.02 GiB, limit 126.00 GiB\n"
           "INFO jaxllm: sized the KV pool in 9.1 s (largest step's temp memory 3.10 GiB)\n"
           "INFO jaxllm: KV cache: 51234 pages of 16 tokens (bfloat16); ...\n"
           "INFO jaxllm.engine.model_runner: start-up: 51 programs lowered in 18.7 s (one "
           "thread), compiled on 16 threads (301.5 s of compiles in all); slowest compiles: "
           "forward T=256 37.1 s\n"
           "INFO jaxllm.engine.model_runner: executable cache (/c/x): 0 programs loaded in 0.1 s, "
           "51 compiled and stored\n"
           "INFO jaxllm: compiled 52 step programs (12 token buckets) in 60.2 s\n"
           "INFO server.cli: ready 84.0 s after start (model load + compile ...)\n")
    assert parse_startup_log(log) == dict(
        load_s=12.5, config_s=3.5, weights_s=2.4, ahead_gb=15.8, tokenizer_s=0.6, fuse_s=0.7,
        size_s=9.1, compile_s=60.2, lowering_s=18.7, compiles_sum_s=301.5, exec_load_s=0.1,
        ready_s=84.0, arrays_gib=14.96, in_use_gib=15.02, programs=52, pages=51234)
    assert parse_startup_log("nothing here") == {}


def test_load_probe_times_both_readers_on_a_written_checkpoint(tmp_path):
    # benchmarks/gpu/load_probe.py on the CPU: a written tiny checkpoint loaded by the loader's
    # reader (twice) and by safetensors' get_tensor, and the raw rates, one process each.
    from startup import write_checkpoint

    folder = tmp_path / "ckpt"
    write_checkpoint(folder, "tiny", None, shard_gb=0.0005)
    out = tmp_path / "load.jsonl"
    probe = REPO / "benchmarks" / "gpu" / "load_probe.py"
    for args in (["--reader", "mmap", "--twice"], ["--reader", "safetensors"], ["--raw"]):
        r = subprocess.run([sys.executable, str(probe), str(folder), "--out", str(out), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["mode"], row.get("reader")) for row in rows] == [
        ("load", "mmap"), ("load", "safetensors"), ("raw", None)]
    for row in rows[:2]:
        assert row["load_s"] > 0 and row["config_s"] > 0 and row["load_gbs"] > 0
    assert rows[0]["load2_s"] > 0
    assert rows[2]["checkpoint_gb"] > 0 and rows[2]["put_views_gbs_1t"] > 0
