"""Scale-out benchmark: N single-GPU engine replicas vs one, under Poisson load (issue 11).

Ray cannot travel to the GPU machine (its wheel alone is 79 MB, over the 64 MiB carry), so this
runs what Ray Serve would run, without Ray: one replica process per GPU (CUDA_VISIBLE_DEVICES=i),
each the aiohttp OpenAI server over an AsyncEngine with random bf16 weights in a real shape (as
benchmarks/serving.py), and a client that routes every request with the policy of the Ray router
(server/prefix_routing.choose_order, queue lengths = the client's in-flight count per replica;
random prompts, so keys spread evenly). Not included: the hop through Ray's HTTP proxy and the
ingress deployment.

Per replica count and request rate: request and output-token throughput, TTFT and e2e p50/p99,
failures, and requests per replica. Needs pydantic (the server) on the machine, as serving.py.

    python3 benchmarks/ray_serving.py --tokenizer .bench/tokenizer --replicas 1,2 \\
        --request-rates 16,32,inf --out $OUT/ray_serving.jsonl
CPU smoke run:
    JAX_PLATFORMS=cpu python3 benchmarks/ray_serving.py --tokenizer DIR --shape tiny \\
        --replicas 1,2 --num-prompts 8 --input-len 16 --output-len 4 --request-rates inf \\
        --attention reference --max-model-len 64 --max-num-batched-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from serving import _one, _pct  # noqa: E402

from server.prefix_routing import choose_order, prefix_key  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_main(args) -> int:
    """One replica: the OpenAI server on args.port until killed; prints READY when serving."""
    from aiohttp import web
    from transformers import AutoTokenizer

    from jaxllm.config import EngineConfig
    from jaxllm.engine.async_engine import AsyncEngine
    from jaxllm.engine.llm_engine import LLMEngine
    from offline_throughput import random_model
    from server.app import build_app

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loaded = random_model(args.shape, args.attention, tokenizer=tok, vocab_size=len(tok))
    cfg = EngineConfig(dtype="bfloat16", max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=False)
    engine = AsyncEngine(engine=LLMEngine(cfg, loaded=loaded))
    app = build_app(engine, served_model_name="bench", max_concurrent_requests=100_000,
                    log_stats_interval=None)
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: print("READY",
                                                                             flush=True))
    return 0


def start_replicas(args, n: int) -> tuple[list[subprocess.Popen], list[int]]:
    procs, ports, logs = [], [], []
    for i in range(n):
        port = _free_port()
        env = dict(os.environ)
        if args.gpus_per_replica:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(i * args.gpus_per_replica + g) for g in range(args.gpus_per_replica))
        cmd = [sys.executable, __file__, "--replica-port", str(port)] + args.passthrough
        log = tempfile.NamedTemporaryFile("w+", prefix=f"replica{i}-", suffix=".log",
                                          delete=False)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      text=True))
        logs.append(log.name)
        ports.append(port)
    deadline = time.time() + args.start_timeout
    for p, log in zip(procs, logs):  # a replica prints READY once its server listens
        while "READY" not in Path(log).read_text():
            if p.poll() is not None or time.time() > deadline:
                tail = Path(log).read_text()[-2000:]
                raise RuntimeError(f"replica did not start (exit {p.returncode}); log {log}:\n"
                                   f"{tail}")
            time.sleep(0.5)
    return procs, ports


async def run_rate(ports: list[int], prompts, max_tokens: int, rate: float, seed: int,
                   page_size: int):
    import aiohttp

    ids = [str(p) for p in ports]
    inflight = {i: 0 for i in ids}
    sent = {i: 0 for i in ids}
    rng = np.random.default_rng(seed)

    async def routed(session, prompt):
        rid = choose_order(prefix_key(prompt, page_size), ids, inflight)[0]
        inflight[rid] += 1
        sent[rid] += 1
        try:
            return await _one(session, f"http://127.0.0.1:{rid}/v1/completions", "bench", prompt,
                              max_tokens)
        finally:
            inflight[rid] -= 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        if math.isfinite(rate):
            arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate,
                                                                        len(prompts) - 1))])
        else:
            arrivals = np.zeros(len(prompts))
        tasks, t0 = [], time.perf_counter()
        for p, at in zip(prompts, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(routed(session, p)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0, [sent[i] for i in ids]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--replicas", default="1,2", help="replica counts to compare")
    p.add_argument("--gpus-per-replica", type=int, default=1, help="0: leave devices alone (CPU)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rates", default="16,32,inf")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16, help="for the routing key")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--replica-port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replica_port is not None:
        args.port = args.replica_port
        return replica_main(args)
    if args.input_len + args.output_len > args.max_model_len:
        p.error("--input-len + --output-len must be <= --max-model-len")
    args.passthrough = ["--tokenizer", args.tokenizer, "--shape", args.shape, "--attention",
                        args.attention, "--max-num-batched-tokens",
                        str(args.max_num_batched_tokens), "--max-num-seqs", str(args.max_num_seqs),
                        "--max-model-len", str(args.max_model_len)]

    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    rng = np.random.default_rng(args.seed)
    # Ids above 1,000 avoid special tokens (as serving.py); random prompts share no prefix.
    prompts = rng.integers(min(1000, vocab // 2), vocab,
                           (args.num_prompts, args.input_len)).tolist()
    rows = []
    for n in [int(x) for x in args.replicas.split(",")]:
        procs, ports = start_replicas(args, n)
        try:
            warm = [rng.integers(min(1000, vocab // 2), vocab, args.input_len).tolist()
                    for _ in range(4 * n)]
            asyncio.run(run_rate(ports, warm, 8, float("inf"), 0, args.page_size))  # compiles
            for rate_s in args.request_rates.split(","):
                res, secs, per = asyncio.run(run_rate(ports, prompts, args.output_len,
                                                      float(rate_s), args.seed + 1,
                                                      args.page_size))
                ok = [r for r in res if r.ok]
                ttft, e2e = [r.ttft for r in ok], [r.e2e for r in ok]
                n_out = sum(r.out_tokens for r in ok)
                rows.append(dict(
                    replicas=n, rate=rate_s, completed=len(ok), failed=len(res) - len(ok),
                    seconds=secs, req_s=len(ok) / secs, output_tok_s=n_out / secs,
                    ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99),
                    e2e_p50_ms=_pct(e2e, 50), e2e_p99_ms=_pct(e2e, 99),
                    requests_per_replica=per))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    print(f"\n{args.shape}, {args.num_prompts} requests {args.input_len} in / {args.output_len} "
          f"out, {args.gpus_per_replica} GPU(s) per replica")
    print(f"{'replicas':>8} {'rate':>6} {'ok':>4} {'fail':>4} {'req/s':>7} {'out tok/s':>10} "
          f"{'TTFT p50/p99 (ms)':>18} {'e2e p50/p99 (ms)':>18}  per replica")
    for r in rows:
        print(f"{r['replicas']:>8} {r['rate']:>6} {r['completed']:>4} {r['failed']:>4} "
              f"{r['req_s']:>7.2f} {r['output_tok_s']:>10.0f} "
              f"{r['ttft_p50_ms']:>8.0f}/{r['ttft_p99_ms']:<9.0f} "
              f"{r['e2e_p50_ms']:>8.0f}/{r['e2e_p99_ms']:<9.0f}  {r['requests_per_replica']}")
    if args.out:
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, shape=args.shape, num_prompts=args.num_prompts,
                                        input_len=args.input_len, output_len=args.output_len,
                                        gpus_per_replica=args.gpus_per_replica,
                                        attention=args.attention,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_model_len=args.max_model_len)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
