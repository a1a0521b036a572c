"""Serving benchmark: the OpenAI server under Poisson load (vLLM's benchmark_serving, in small).

One process: random bf16 weights in a real shape, the aiohttp server on 127.0.0.1, and an
aiohttp client sending streaming /v1/completions requests (token-id prompts, ignore_eos, greedy)
at Poisson arrival rates. Per rate: request and output-token throughput, TTFT / TPOT / ITL / e2e
p50 and p99, failures. Then the same prompts through the engine directly, all at once (offline),
so server overhead = 1 - server(rate=inf) / offline output tok/s. The offline pass does not
detokenize (like offline_throughput.py), so the overhead includes the server's detokenization.

A request counts as failed on a non-200 answer, a broken stream, an error event in the stream,
or a stream that ends without [DONE] or without a usage chunk.

The server detokenizes, so the vocabulary is the tokenizer's (SmolLM2's 49,152 ids instead of
Llama-3's 128,256: the lm_head is ~3% of the 8B shape's weight bytes).

    python3 benchmarks/serving.py --tokenizer .bench/tokenizer --out $OUT/serving.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, engine_generate, random_model  # noqa: E402


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    out_tokens: int = 0


async def _one(session, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res, last, done, error = Result(ok=False), None, False, False
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                await r.read()
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = True
                if chunk.get("usage"):
                    res.out_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = done and not error and last is not None and res.out_tokens > 0
    except Exception:  # a broken stream counts as a failure, the run goes on
        res.ok = False
    return res


async def _run_rate(port: int, model: str, prompts, max_tokens: int, rate: float, seed: int):
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = np.random.default_rng(seed)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        # Arrival times: the first at 0, then exponential gaps (an absolute schedule, so event
        # loop delays do not accumulate); rate=inf sends everything at once.
        if math.isfinite(rate):
            arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate,
                                                                        len(prompts) - 1))])
        else:
            arrivals = np.zeros(len(prompts))
        tasks = []
        t0 = time.perf_counter()
        for p, at in zip(prompts, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url, model, p, max_tokens)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def _pct(xs, q):
    return float(np.percentile(xs, q) * 1e3) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--attention", default="pallas", choices=["reference", "pallas"])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rates", default="2,8,32,inf")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="prompts and Poisson arrivals")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.input_len + args.output_len > args.max_model_len:
        p.error("--input-len + --output-len must be <= --max-model-len")

    import jax
    from aiohttp import web
    from transformers import AutoTokenizer

    from jaxllm.config import EngineConfig
    from jaxllm.engine.async_engine import AsyncEngine
    from jaxllm.engine.llm_engine import LLMEngine
    from server.app import build_app

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    loaded = random_model(args.shape, args.attention, tokenizer=tok, vocab_size=len(tok))
    mc = loaded.model_config
    print(f"note: vocab_size is the tokenizer's {mc.vocab_size}, not the shape's "
          f"{SHAPES[args.shape]['vocab_size']} (the server detokenizes); for llama3-8b the "
          f"lm_head reads are ~3% of weight bytes, so figures are close to, not equal to, "
          f"real Llama-3-8B", flush=True)
    T = args.max_num_batched_tokens
    cfg = EngineConfig(dtype="bfloat16", max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=T,
                       enable_prefix_caching=False)
    engine = LLMEngine(cfg, loaded=loaded)
    rng = np.random.default_rng(args.seed)
    # Ids above 1,000 avoid the tokenizer's special tokens (a prompt of them would still work).
    prompts = rng.integers(1000, mc.vocab_size, (args.num_prompts, args.input_len)).tolist()

    async def serve_and_load() -> list[dict]:
        aengine = AsyncEngine(engine=engine)
        app = build_app(aengine, served_model_name=loaded.name,
                        max_concurrent_requests=10 * args.num_prompts)
        runner = web.AppRunner(app)
        await runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        rows = []
        try:
            await _run_rate(port, loaded.name, prompts[:4], 8, float("inf"), 0)  # warm-up
            for rate_s in args.request_rates.split(","):
                rate = float(rate_s)
                res, secs = await _run_rate(port, loaded.name, prompts, args.output_len, rate,
                                               args.seed + 1)
                ok = [r for r in res if r.ok]
                ttft = [r.ttft for r in ok]
                tpot = [(r.e2e - r.ttft) / (r.out_tokens - 1) for r in ok if r.out_tokens > 1]
                itl = [x for r in ok for x in r.itl]
                e2e = [r.e2e for r in ok]
                n_out = sum(r.out_tokens for r in ok)
                rows.append(dict(
                    kind="server", rate=rate_s, completed=len(ok), failed=len(res) - len(ok),
                    seconds=secs, req_s=len(ok) / secs, output_tok_s=n_out / secs,
                    ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99),
                    tpot_p50_ms=_pct(tpot, 50), tpot_p99_ms=_pct(tpot, 99),
                    itl_p50_ms=_pct(itl, 50), itl_p99_ms=_pct(itl, 99),
                    e2e_p50_ms=_pct(e2e, 50), e2e_p99_ms=_pct(e2e, 99)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            await runner.cleanup()
            aengine.shutdown()
        return rows

    rows = asyncio.run(serve_and_load())

    secs, n_out = engine_generate(engine, prompts, args.output_len)
    rows.append(dict(kind="offline", rate="all at once", completed=args.num_prompts, failed=0,
                     seconds=secs, req_s=args.num_prompts / secs, output_tok_s=n_out / secs))
    server_inf = [r for r in rows if r["kind"] == "server" and r["rate"] == "inf"]
    overhead = (1 - server_inf[0]["output_tok_s"] / rows[-1]["output_tok_s"]) if server_inf else None
    device = jax.devices()[0].device_kind
    print(f"\n{device}, {args.shape} (vocab {mc.vocab_size}), {args.num_prompts} requests "
          f"{args.input_len} in / {args.output_len} out")
    print(f"{'rate':>12} {'ok':>4} {'fail':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50/p99':>15} "
          f"{'TPOT p50/p99':>15} {'ITL p50/p99':>15} {'e2e p50/p99 (ms)':>18}")
    for r in rows:
        def pair(k):
            return f"{r[k + '_p50_ms']:.0f}/{r[k + '_p99_ms']:.0f}" if k + "_p50_ms" in r else "-"
        print(f"{r['rate']:>12} {r['completed']:>4} {r['failed']:>4} {r['req_s']:>7.2f} "
              f"{r['output_tok_s']:>10.0f} {pair('ttft'):>15} {pair('tpot'):>15} "
              f"{pair('itl'):>15} {pair('e2e'):>18}")
    if overhead is not None:
        print(f"server overhead at rate=inf vs offline: {overhead * 100:.1f}%")
    if args.out:
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, device=device, shape=args.shape,
                                        vocab_size=mc.vocab_size, attention=args.attention,
                                        num_prompts=args.num_prompts, input_len=args.input_len,
                                        output_len=args.output_len,
                                        max_num_batched_tokens=T, max_model_len=args.max_model_len,
                                        max_num_seqs=args.max_num_seqs,
                                        server_overhead=overhead)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
