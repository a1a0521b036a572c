#!/bin/bash
# The open issues' GPU figures on nvidia-h200-x2, in two parts that each fit one device call
# (< 10 min). Independent single-GPU jobs run side by side, one per GPU.
#   bash benchmarks/gpu/issues.sh single   GPU0: FP8 end to end (issue 6) + FP8 GPU tests, then
#                                          tp1 (issue 8); GPU1: prefix caching on/off (issue 4)
#                                          + the FP8 matmul sweep (issue 5)
#   bash benchmarks/gpu/issues.sh next     profiles and latency of the unmeasured changes (bf16 on
#                                          GPU0, fp8 on GPU1)
#   bash benchmarks/gpu/issues.sh measure  throughput bf16 / fp8 at the defaults, fp8 batch-1
#                                          latency W8A8 vs weight-only, the decode profile
#   bash benchmarks/gpu/issues.sh eager    enforce_eager at batch 1/64/256, fp8 host-side trace,
#                                          Triton vs Mosaic GPU (kernels.py --sections backends)
#   bash benchmarks/gpu/issues.sh cbupdate command-buffer update cost: default vs SKIP_TEMP
#   bash benchmarks/gpu/issues.sh startup  cold start with and without GEMM autotuning; fp8 vs
#                                          bf16 throughput at 256 / 2048
#   bash benchmarks/gpu/issues.sh next2    prefill block sweep; cold start with the nested
#                                          attention jit; fp8 at the defaults
#   bash benchmarks/gpu/issues.sh next3    decode sweep in GPU time; batch-1 latency: table vs
#                                          split by pages vs the fused K/V write
#   bash benchmarks/gpu/issues.sh next4    GEMM sweep in GPU time (fp8 targets); host-bound or
#                                          GPU-bound (bf16 batch 1/256, fp8 batch 1); fp8 latency
#   bash benchmarks/gpu/issues.sh fp8tp    fp8 throughput at the defaults (run twice: warm cache)
#   bash benchmarks/gpu/issues.sh allreduce  all-reduce latency under XLA/NCCL variants, tp2 b1
#   bash benchmarks/gpu/issues.sh throughput  offline throughput at vLLM's H200 batch defaults
#   bash benchmarks/gpu/issues.sh b1       (one GPU) lm_head GEMM in GPU time; batch-1 latency:
#                                          table vs fused K/V write vs bf16 logits vs split
#                                          pages; host wait at batch 1 / 256
#   bash benchmarks/gpu/issues.sh sweep1   (one GPU) decode sweep in GPU time at the shapes
#                                          not yet swept so; bf16 throughput at the defaults
#   bash benchmarks/gpu/issues.sh lmhead   (one GPU) the logits GEMM alone vs behind the norm /
#                                          gather; the step's GEMM configs (HLO dump); latency
#                                          compiled on one thread; the decode sweep (issue 5)
#   bash benchmarks/gpu/issues.sh b1why    (one GPU) which GEMM the batch-1 step's 0.47 ms
#                                          "gemm_fusion_dot" is (op counts, HLO dump); the fp8
#                                          batch-1 profile and latency
#   bash benchmarks/gpu/issues.sh fp8one   (one GPU) fp8 batch-1 latency; fp8 throughput at
#                                          the defaults
#   bash benchmarks/gpu/issues.sh b1hlo    (one GPU) the batch-1 step of latency.py's engine (8
#                                          sequences), bf16 and fp8: kept traces and optimized
#                                          HLO (what each small kernel is); the decode sweep's
#                                          512-context shapes
#   bash benchmarks/gpu/issues.sh b1small  (one GPU) batch-1 latency with the 1-sequence decode
#                                          program (small_decode_buckets) vs without; its
#                                          profile; fp8 batch 1
#   bash benchmarks/gpu/issues.sh b1prof   (one GPU) profiles of b1small's two programs, bf16
#                                          and fp8, with the GPU clocks
#   bash benchmarks/gpu/issues.sh gemmopt  (one GPU) the step's GEMMs under per-program XLA
#                                          options (cuBLAS, exhaustive tiling, warp
#                                          specialization) in GPU time; batch-1 latency with
#                                          XLA's defaults and with cuBLAS for every GEMM
#   bash benchmarks/gpu/issues.sh fp8def   (one GPU) fp8 throughput at the defaults; the decode
#                                          sweep's 1 x 512 and 64 x 32k in GPU time
#   bash benchmarks/gpu/issues.sh tpdef    (one GPU) throughput at the defaults: bf16, fp8 and
#                                          fp8 + fp8 KV with cuBLAS GEMMs from 32 tokens
#   bash benchmarks/gpu/issues.sh fp8out   (one GPU) fp8 throughput at the defaults, the W8A8
#                                          GEMM writing fp32 (default) vs bf16, interleaved
#   bash benchmarks/gpu/issues.sh fp8kv    (one GPU) decode attention over fp8 pages vs bf16 in GPU
#                                          time; batch-256 fp8 profiles with bf16 and fp8 KV
#   bash benchmarks/gpu/issues.sh kvdot    (one GPU) fp8 + fp8 KV throughput at the defaults with
#                                          fp8 pages upcast to float16 vs to bf16, interleaved
#   bash benchmarks/gpu/issues.sh prefillprof  (one GPU) GPU time by op group of the fp8 / bf16
#                                          16384-token prefill step
#   bash benchmarks/gpu/issues.sh kvwrite  (one GPU) throughput with the unique-slot K/V scatter
#                                          against the atomic one, and the fp8 prefill profile
#   bash benchmarks/gpu/issues.sh hp       (one GPU) the decode kernel with several KV heads a
#                                          program, swept; fp8 + fp8 KV throughput with it
#   bash benchmarks/gpu/issues.sh confirm  (one GPU) throughput at the defaults hp set: bf16, fp8,
#                                          fp8 + fp8 KV, and the GEMM's float32 output
#   bash benchmarks/gpu/issues.sh gputests (one GPU) tests/test_gpu.py, then bf16 batch-1 latency
#   bash benchmarks/gpu/issues.sh swiglu   (one GPU) the fp8 MLP's fused SwiGLU + quantization
#                                          kernel, then fp8 throughput with and without it
#   bash benchmarks/gpu/issues.sh swiglu3  (one GPU) the SwiGLU kernel's row mode vs XLA; fp8 +
#                                          fp8 KV throughput with it and without
#   bash benchmarks/gpu/issues.sh night    (one GPU) the SwiGLU kernel with the pipeliner; the GPU
#                                          tests
#   bash benchmarks/gpu/issues.sh swiglul2 (one GPU) the SwiGLU kernel with rows in flight that fit
#                                          the L2; one fp8 + fp8 KV run with the best
#   bash benchmarks/gpu/issues.sh swiglu4  (one GPU) the SwiGLU kernel's flat (vector) tile loads
#   bash benchmarks/gpu/issues.sh cbupd    (one GPU) the batch-1 step's command-buffer updates:
#                                          which buffers move, host vs wall per launch
#   bash benchmarks/gpu/issues.sh swigluab (one GPU) fp8 + fp8 KV throughput with the flat
#                                          SwiGLU kernel and without, twice each, interleaved
#   bash benchmarks/gpu/issues.sh multistep (one GPU) multi-step decode: its GPU test; fp8 batch-1
#                                          latency at 1, 4, 8 steps a launch
#   bash benchmarks/gpu/issues.sh multistep2 (one GPU) the same for bf16 (8B) and SmolLM2-135M
#   bash benchmarks/gpu/issues.sh multistep3 (one GPU) offline throughput with 4 steps a launch
#   bash benchmarks/gpu/issues.sh normfold (one GPU) the input RMSNorm folded into the q/k/v GEMM
#                                          and the decode kernel: check, batch-1 latency
#   bash benchmarks/gpu/issues.sh normfold2 (one GPU) the same with the norm's factor in the
#                                          scores' scale over bf16 pages, in rounds
#   bash benchmarks/gpu/issues.sh normfold3 (one GPU) the fold as the default (<= 16 tokens)
#                                          against it off, batch 1 and 16
#   bash benchmarks/gpu/issues.sh foldcheck (one GPU) the fold's default at batch 8, then the
#                                          GPU tests
#   bash benchmarks/gpu/issues.sh spread  (one GPU) batch 1 with the padding slots' decode programs
#                                          working for the live sequence
#   bash benchmarks/gpu/issues.sh b1attn  (one GPU) the batch-1 decode attention call alone
#                                          (decode_b1.py --full), then batch 1 with its fastest
#   bash benchmarks/gpu/issues.sh b1single / b1single2  (one GPU) decode_b1.py in three rounds,
#                                          then batch 1 against `decode_single` (reduce /
#                                          unrolled combine)
#   bash benchmarks/gpu/issues.sh osplit   (one GPU) batch-1 profiles and latency with the o
#                                          projection as summed split-K partials (`o_split_k`)
#   bash benchmarks/gpu/issues.sh mlpfold  (one GPU) the same with the MLP's norm folded
#                                          (`fold_mlp_norm`); both knobs are only in 4b83398
#                                          (no gain, taken out after): run them from there
#   bash benchmarks/gpu/issues.sh fusedmlp (one GPU) the one-kernel decode MLP
#                                          (pallas_kernels/fused_mlp.py) against XLA's chain
#   bash benchmarks/gpu/issues.sh mlpk     (one GPU) its GPU tests, then batch 1 with the MLP's
#                                          norm + gate/up + SwiGLU kernel (`mlp_kernel`) in rounds
#   bash benchmarks/gpu/issues.sh mlpdef   (one GPU) with `mlp_kernel` the bf16 default: all GPU
#                                          tests, then bf16 batch 1 against the knob off
#   bash benchmarks/gpu/issues.sh mlptile  (one GPU) gate_up_swiglu's bf16 tile past the sweep's
#                                          edge, then batch 1 with the best against the table's
#   bash benchmarks/gpu/issues.sh resgemm  (one GPU) the o / down GEMM with the residual add in
#                                          its epilogue: GPU tests, block sweep, layer chains
#   bash benchmarks/gpu/issues.sh qkvsk    (one GPU) bf16 batch 1 with the q/k/v GEMM split 2 /
#                                          4 / 8 ways, and 8 steps a launch
#   bash benchmarks/gpu/issues.sh k8       (one GPU) batch 1, 8 steps a launch against 4
#   bash benchmarks/gpu/issues.sh verdict  (one GPU) batch 1 against the same run's roofline
#                                          (bf16, fp8); batch-256 host wait
#   bash benchmarks/gpu/issues.sh idle     (one GPU) the GPU's idle share of a batch-256 decode
#                                          step, three ways; batch 1's step replayed
#   bash benchmarks/gpu/issues.sh mosaic   (one GPU) Mosaic GPU matmuls (shipped, split-K,
#                                          swapped, fp8) at batch-1 rows against XLA (run
#                                          2026-12-03 11:50: none faster; RESULTS)
#   bash benchmarks/gpu/issues.sh mchain   (one GPU) the Mosaic GPU persistent chain (weight
#                                          stream ahead of a semaphore barrier) vs XLA
#   bash benchmarks/gpu/issues.sh mchain3  (one GPU) the chain's barrier latency, link by link
#   bash benchmarks/gpu/issues.sh mprof    (one GPU) the chain under Mosaic GPU's profiler
#   bash benchmarks/gpu/issues.sh mchain4  (one GPU) the chain without the per-layer zero poll
#   bash benchmarks/gpu/issues.sh mchain5  (one GPU) the chain's signal as a relaxed atomic
#   bash benchmarks/gpu/issues.sh mchain6  (one GPU) the release's parts; the signals stressed
#   bash benchmarks/gpu/issues.sh mchain7  (one GPU) a release-only fence, timed and stressed
#   bash benchmarks/gpu/issues.sh mchain8  (one GPU) the flat pipeline's deeper run-ahead
#   bash benchmarks/gpu/issues.sh mchain9  (one GPU) the release fence's stall off the path
#   bash benchmarks/gpu/issues.sh mgather  (one GPU) the chain with partials polled by their
#                                          readers: no signal between layers
#   bash benchmarks/gpu/issues.sh mgather2 (one GPU) the gather form's polls profiled
#   bash benchmarks/gpu/issues.sh mdyn    (one GPU) the chain with a layer's units from a counter
#   bash benchmarks/gpu/issues.sh ml2     (one GPU) the chain with the next layer's weights
#                                          prefetched into the L2
#   bash benchmarks/gpu/issues.sh mbar    (one GPU) the chain's grid barrier alone
#   bash benchmarks/gpu/issues.sh mpdl    (one GPU) a kernel a layer with programmatic
#                                          dependent launch (mosaic_pdl.py)
#   bash benchmarks/gpu/issues.sh mlpwo    (one GPU) the MLP kernel's weight-only fp8 modes in
#                                          layer chains (GPU tests first)
#   bash benchmarks/gpu/issues.sh serve8b  (one GPU) time to first served request from a random
#                                          8B checkpoint on disk, cold and restarted (startup.py)
#   bash benchmarks/gpu/issues.sh loadprobe  (one GPU) where the 8B checkpoint's load goes:
#                                          the two readers, warm and cold (load_probe.py)
#   OLD=DIR bash benchmarks/gpu/issues.sh serveab  (one GPU) time to first served request of
#                                          this tree against the checkout in DIR, alternating
#   bash benchmarks/gpu/issues.sh layerjit  (one GPU) the layers through one nested jit against
#                                          the plain loop: compiled ops, lowering, latency
#   bash benchmarks/gpu/issues.sh coldab  (one GPU) 8B cold starts (empty caches) under settings
#                                          that may shorten XLA's compiles (VARIANTS)
#   bash benchmarks/gpu/issues.sh structured  (one GPU) structured outputs and late sampling
#                                          at batch 256 (B=...) on the 8B checkpoint
#   bash benchmarks/gpu/issues.sh h100verdict (nvidia-h100-x1) issue 9's throughput beside HF
#                                          and batch 1, on the H100
#   bash benchmarks/gpu/issues.sh lora     (one GPU) LoRA's decode cost on the 8B shape, then
#                                          the GPU tests
#   bash benchmarks/gpu/issues.sh lora2    (nvidia-h100-x1) the LoRA delta's formulations
#                                          (lora.py --impl) A/B, then batch 256's GPU idle share
#   bash benchmarks/gpu/issues.sh lora3    (nvidia-h100-x1) LoRA's decode cost with
#                                          specialize_lora, then the LoRA GPU test
#   bash benchmarks/gpu/issues.sh gpuall   (one GPU) every GPU test, nothing else
#   bash benchmarks/gpu/issues.sh b1table  (one GPU) the batch-1 decode attention call over the
#                                          decode table's sweep, then an fp8 batch-1 A/B
#   bash benchmarks/gpu/issues.sh h100chain (one GPU) the persistent o chain and the grid
#                                          barrier alone on the machine it runs on
#   bash benchmarks/gpu/issues.sh fp8chain (one GPU) the persistent o chain over fp8 weights,
#                                          W8A8 with the activations quantized inside
#   bash benchmarks/gpu/issues.sh mlpchain (one GPU) the persistent fp8 MLP pair (gate/up | down,
#                                          a grid barrier after each) against XLA's MLP
#   bash benchmarks/gpu/issues.sh attnchain (one GPU) the persistent fp8 attention half (q/k/v |
#                                          attention | o, a grid barrier after each) against
#                                          the engine's
#   bash benchmarks/gpu/issues.sh b1mgpu   (one GPU) the engine's batch-1 fp8 step with each
#                                          layer as two Mosaic GPU kernels (JAXLLM_FP8_B1_MGPU):
#                                          its GPU check, then batch 1 with and without it
#   bash benchmarks/gpu/issues.sh spec     (one GPU) speculative decoding at batch 1 / 4 on
#                                          the 8B shape: plain vs n-gram drafts, k = 2 / 4 / 8
#   bash benchmarks/gpu/issues.sh multi    tp2 / pp2 on the 8B shape and tp2 on the 70B shape
#                                          (issue 8), then 1 vs 2 replicas (issue 11)
# Carry .bench (a saved SmolLM2 tokenizer: the GPU tests and the server benchmark need one; make
# it with tokenizer.save_pretrained) and, for scaleout, .whl (pydantic wheels, see the device
# README; for structured outputs and the GPU test of them also llguidance's: pip download
# --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_31_x86_64 -d .whl
# llguidance==1.9.1).
# JSON lines and logs go to $OUT.
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
# Processes that compile the same programs (the two engines of prefix_cache.py) share them.
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v "Compiling\|it/s\]\|bucket/s" ; }
# The OS page cache dropped (a cold read from the disk), where the container allows it.
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo dropped;
         else echo "page cache not dropped (not allowed here)"; fi; }
# The tail of each lane's log (lines without indented tables, at most N), then all logs into
# one tarball under $OUT (few files come back from the device machine).
show_logs() { for f in $L/*.log; do echo "=== $f"; quiet < $f | grep -v "^    \|Delay kernel" | tail -$1; done
              tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L; }
# One line per throughput log of the mode: its output tok/s and split by step kind.
tp_rows() { for f in $L/tp_*.log; do
              echo "$f $(grep -ho '"output_tok_s": [0-9.]*\|"step_split.*' $f | tr '\n' ' ')"
            done; }
# idle256 N: N profiles of the batch-256 decode step at 1k context (profile_step.py): the GPU's
# idle share, by the profiler (a bound), the host wait and the step replayed back to back.
idle256() { for i in $(seq $1); do [ $((T - SECONDS)) -gt 170 ] || break
    timeout 160 python3 benchmarks/profile_step.py --context 1024 --steps 20 --top 6 \
      --batch 256 --out-dir /tmp/p256 --out $OUT/results.jsonl > $L/prof256_r$i.log 2>&1
    echo "rc=$?"; grep -A3 "^batch " $L/prof256_r$i.log | cut -c1-260; done; }
# wheels: installs the carried .whl (pydantic, llguidance) for this call's python.
wheels() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
             --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site; }
# prof_fp8 B NAME: profile_step.py's fp8 decode step of B rows at 1k context, 4 steps a launch
# (its top 8 kernels), into $L/prof_NAME.log.
prof_fp8() { timeout 120 python3 benchmarks/profile_step.py --context 1024 --steps 6 --top 8 \
  --batch $1 --max-num-seqs $1 --num-scheduler-steps 4 --quantization fp8 --out-dir /tmp/po \
  --out $OUT/results.jsonl > $L/prof_$2.log 2>&1; }
# fp8_b1_ab VAR "VARIANTS": fp8 batch 1 at 1k context (4 steps a launch) with VAR set to each
# of VARIANTS in turn ("xla": unset), R rounds (default 1), while T leaves 100 s; the
# ms/token lines shown.
fp8_b1_ab() { local var=$1 v i
  for i in $(seq 1 ${R:-1}); do
    for v in $2; do
      [ $((T - SECONDS)) -gt 100 ] || break
      unset $var
      [ $v = xla ] || export "$var=$v"
      timeout 240 $LAT1K --quantization fp8 --num-scheduler-steps 4 > $L/lat_fp8_${v}_r$i.log 2>&1
    done; done
  unset $var
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f | cut -c1-150)"; done; }
# gpu_tests LINES [ARGS]: tests/test_gpu.py (pytest ARGS) until T's last 10 s, its last LINES
# lines shown (carry .bench: the saved tokenizer).
# Verbose, so a run cut by the limit still names every test it finished and the one it was in.
gpu_tests() { local n=$1; shift
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout $((T - SECONDS - 10)) python3 -m pytest \
    -v -m gpu -p no:cacheprovider ${GPU_TEST_IDS:-tests/test_gpu.py} "$@" > $L/gpu_tests.log 2>&1
  echo "rc=$? (124: cut by the limit)"
  echo "passed $(grep -c ' PASSED' $L/gpu_tests.log), failed $(grep -c ' FAILED' $L/gpu_tests.log)"
  grep -E " (FAILED|ERROR)" $L/gpu_tests.log | head -10
  grep -v "^\s*$" $L/gpu_tests.log | tail -$n; }
# swiglu_sweep FACTOR LINES [ARGS]: the SwiGLU kernel's sweep (swiglu_quant.py ARGS; its last
# LINES lines shown), then BEST = its fastest tile at 16384 x bf16 if under FACTOR x XLA's time.
swiglu_sweep() { local f=$1 n=$2; shift 2
  timeout 150 python3 benchmarks/gpu/swiglu_quant.py --out $OUT/swiglu.jsonl "$@" 2>&1 \
    | tee $L/swiglu_kernel.log | tail -$n
  BEST=$(swiglu_best $f); echo "best tile: '$BEST'"; }
# The fastest SwiGLU tile of the mode's sweep at 16384 x bf16 as "rows,chunk,warps,stages", if
# it takes under $1 x XLA's time; else nothing.
swiglu_best() { python3 - "$OUT/swiglu.jsonl" "$1" <<'EOF'
import json, sys
rs = [json.loads(line) for line in open(sys.argv[1])]
rs = [r for r in rs if r["T"] == 16384 and r.get("acc") == "bfloat16" and r["kernel_us"]
      and r.get("flat", True)]  # the engine's tiles are flat
b = min(rs, key=lambda r: r["kernel_us"])
if b["kernel_us"] < float(sys.argv[2]) * b["xla_us"]:
    print(f"{b['rows']},{b['chunk']},{b['warps']},{b.get('stages', 1)}")
EOF
}
T=${T:-560}  # seconds each lane may take, so the call returns its logs before the limit
# Batch-1 latency at 1k context (decode) and TTFT at 512, three repeats.
LAT1K="python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
# LAT1K with 4 decode steps a launch, bf16 then fp8, each without and with the attention knobs
# $1 (JSON), interleaved: logs lat_{bf16,fp8}_k4.log and lat_{bf16,fp8}_k4_$2.log; $3: the
# time limit of a run (s).
lat_knobs_ab() { for q in bf16 fp8; do
    QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    timeout ${3:-100} $LAT1K $QA --num-scheduler-steps 4 > $L/lat_${q}_k4.log 2>&1
    JAXLLM_ATTENTION_KNOBS="$1" timeout ${3:-100} $LAT1K $QA --num-scheduler-steps 4 \
      > $L/lat_${q}_k4_$2.log 2>&1
  done; }
# Batch-1 latency (4 steps a launch) at the defaults (d) against JAXLLM_ATTENTION_KNOBS=$1
# (tag $2), bf16 and fp8 (LAT_Q: the ones to run), in $3 rounds that alternate which goes first; each run under a
# timeout of $4 s, none started with less than $5 s of $T left. Logs: $L/lat_{bf16,fp8}_{d,$2}_r<i>.log.
lat_rounds() { for i in $(seq 1 $3); do
    for q in ${LAT_Q:-bf16 fp8}; do [ $((T - SECONDS)) -gt $5 ] || break
      QA=""; [ $q = fp8 ] && QA="--quantization fp8"
      for v in $([ $((i % 2)) = 1 ] && echo "d $2" || echo "$2 d"); do
        K=""; [ $v = $2 ] && K=$1
        JAXLLM_ATTENTION_KNOBS="$K" timeout $4 $LAT1K $QA --num-scheduler-steps 4 \
          > $L/lat_${q}_${v}_r$i.log 2>&1
      done; done; done
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done; }
# Batch-1 profiles (4 steps a launch; GPU ops a step, top kernels) at the defaults (d) and with
# JAXLLM_ATTENTION_KNOBS=$1 (tag $2), bf16 and fp8, then lat_rounds of the two, two rounds.
prof_knobs_ab() { for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    for v in d $2; do K=""; [ $v = $2 ] && K=$1
      JAXLLM_ATTENTION_KNOBS="$K" timeout 100 python3 benchmarks/profile_step.py \
        --context 1024 --steps 6 --top 14 --batch 1 --max-num-seqs 8 --num-scheduler-steps 4 \
        $QA --out-dir /tmp/po --out $OUT/results.jsonl > $L/prof_${q}_${v}.log 2>&1
    done; done
  for f in $L/prof_*.log; do echo "== $f"; grep -A16 "^batch " $f | cut -c1-110; done
  lat_rounds "$1" $2 2 60 50; }
# benchmarks/gpu/decode_b1.py (the batch-1 decode attention call alone) with the arguments given,
# its rows to $OUT/decode_b1.jsonl, its log to $L/decode_b1.log; prints its table (DB1_S: its
# time limit, default 330 s).
decode_b1() { timeout ${DB1_S:-330} python3 benchmarks/gpu/decode_b1.py "$@" \
    --out $OUT/decode_b1.jsonl > $L/decode_b1.log 2>&1
  sed -n '/^variant/,$p' $L/decode_b1.log; }
# Offline throughput, 1,000 x 512/128, once (the modes add batch limits / quantization).
TP="python3 benchmarks/throughput.py --engine jaxllm --workload fixed --repeats 1 --out $OUT/results.jsonl"
# The folded input RMSNorm (``qkv_norm``) compiled at the 8B heads over bf16 pages against the
# unfolded kernel on pre-scaled q/k/v: relative error of the output, share of page values that differ.
normfold_check() {
  timeout 100 python3 - > $L/check.log 2>&1 <<'PY'
import functools, jax, jax.numpy as jnp, numpy as np
from tests.test_pallas_kernels import _random_batch
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
rng = np.random.default_rng(3)
T, S, M, B, H, K, D, E, parts = 8, 8, 64, 16, 32, 8, 128, 4096, 4
args, _ = _random_batch(rng, kinds=("decode",) * 5, T=T, S=S, M=M, B=B, P=S * M + 2, H=H,
                        K=K, D=D, dtype=jnp.bfloat16)
_, kp, vp, sl, pt, qsl, ns = args
partials = jnp.asarray(rng.standard_normal((parts, T, K, 6 * D)) * 3, jnp.float32)
x = jnp.asarray(rng.standard_normal((T, E)) * rng.uniform(0.2, 5, (T, 1)), jnp.bfloat16)
r = jax.lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2, -1) + 1e-5)
pos = np.maximum(np.asarray(sl) - 1, 0)
slots = jnp.asarray(np.asarray(pt)[np.arange(S), pos // B] * B + pos % B, jnp.int32)
ang = jnp.asarray(pos, jnp.float32)[:, None] * jnp.linspace(0.01, 1, D // 2)[None, :]
def run(q, **kw):
    return jax.jit(functools.partial(ragged_paged_attention, sm_scale=D ** -0.5,
                                     decode_only=True, qkv_rope=(ang, 1.0, 1.0), **kw))(
        q, kp, vp, sl, pt, qsl, ns, new_kv=(None, None, slots))
a = run(partials.reshape(parts * T, K, 6 * D), qkv_parts=parts, qkv_dtype=jnp.bfloat16,
        qkv_norm=(x, 1e-5))
b = run((partials.sum(0) * r[:, None, None]).astype(jnp.bfloat16))
err = [float(jnp.linalg.norm((u.astype(jnp.float32) - w.astype(jnp.float32))[:5]) /
             jnp.linalg.norm(w.astype(jnp.float32)[:5])) for u, w in zip(a[:1], b[:1])]
pages = [float(jnp.mean((u != w).astype(jnp.float32))) for u, w in zip(a[1:], b[1:])]
print("norm fold check: out rel err", err, "pages differing", pages)
PY
  cat $L/check.log | tail -3; }
case "$1" in
single)
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   python3 benchmarks/fp8.py engine --out $OUT/fp8.jsonl > $OUT/fp8_engine.log 2>&1
   JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer python3 -m pytest -q -m gpu tests/test_gpu.py -k fp8 > $OUT/fp8_tests.log 2>&1
   python3 benchmarks/parallel.py --configs tp1 --out $OUT/parallel.jsonl > $OUT/tp1.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   python3 benchmarks/prefix_cache.py --attention pallas --out $OUT/prefix.jsonl > $OUT/prefix.log 2>&1
   python3 benchmarks/fp8.py matmul --out $OUT/fp8_matmul.jsonl > $OUT/fp8_matmul.log 2>&1") &
  wait
  for f in fp8_engine fp8_tests tp1 prefix fp8_matmul; do
    echo "=== $f"; quiet < $OUT/$f.log | tail -25
  done ;;
multi)
  timeout 330 python3 benchmarks/parallel.py --configs tp2,pp2 --out $OUT/parallel.jsonl \
    > $OUT/parallel.log 2>&1
  timeout 200 python3 benchmarks/parallel.py --configs tp2 --shape llama3-70b --repeats 1 \
    --num-prompts 128 --out $OUT/parallel.jsonl > $OUT/parallel70.log 2>&1
  for f in parallel parallel70; do echo "=== $f"; quiet < $OUT/$f.log | tail -20; done ;;
scaleout)
  for f in "" "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" \
           "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"; do
    XLA_FLAGS="$f" timeout 60 python3 benchmarks/parallel.py --allreduce-only 2 2>&1 | grep '^{' \
      | tee -a $OUT/parallel.jsonl
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  timeout 420 python3 benchmarks/ray_serving.py --tokenizer .bench/tokenizer --replicas 1,2 \
    --request-rates 32,inf --out $OUT/ray_serving.jsonl > $OUT/ray_serving.log 2>&1
  quiet < $OUT/ray_serving.log | tail -30 ;;
next)  # nvidia-h200-x2, one call: the changes of 2026-11-30 not yet measured (decode-only steps,
  # packed inputs, kernel decode_only path, fused q/k/v and gate/up, fp8 weight-only). Two lanes
  # of ~9 min, most wanted first (a lane past $T loses only its tail): GPU0 bf16 profiles +
  # latency, GPU1 the small-M GEMM table + fp8 profiles.
  P="python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 12"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   $P --batch 1 256 --out-dir /tmp/p1 --out $OUT/profile.jsonl > $OUT/prof_default.log 2>&1
   $P --batch 1 256 --out-dir /tmp/pf --no-fuse --out $OUT/profile.jsonl > $OUT/prof_nofuse.log 2>&1
   python3 benchmarks/latency.py --engine jaxllm --contexts 128 1024 8192 --prefill 512 4096 8192 --out $OUT/latency.jsonl > $OUT/latency.log 2>&1
   $P --batch 1 256 --out-dir /tmp/p0 --no-decode-only --no-pack --no-fuse --out $OUT/profile.jsonl > $OUT/prof_none.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   python3 benchmarks/gpu/fp8_small_m.py --out $OUT/fp8_small_m.jsonl > $OUT/fp8_small_m.log 2>&1
   $P --batch 1 --out-dir /tmp/p8 --quantization fp8 --out $OUT/profile8.jsonl > $OUT/prof_fp8.log 2>&1
   $P --batch 1 --out-dir /tmp/p8f --quantization fp8 --no-fuse --out $OUT/profile8.jsonl > $OUT/prof_fp8_nofuse.log 2>&1
   JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16 $P --batch 1 --out-dir /tmp/p8w --quantization fp8 --out $OUT/profile8.jsonl > $OUT/prof_fp8_w8a16.log 2>&1") &
  wait
  for f in prof_default prof_nofuse prof_none latency fp8_small_m prof_fp8 prof_fp8_nofuse prof_fp8_w8a16; do
    echo "=== $f"; quiet < $OUT/$f.log | grep -v "^    " | tail -12
  done ;;
measure)  # nvidia-h200-x2, one call: the headline figures at the engine's defaults (fused
  # projections, vLLM's batch limits). GPU0: offline throughput bf16 then the b1/b256 profile
  # with the wall taken outside the profiler; GPU1: fp8 batch-1 latency W8A8 vs weight-only
  # (the profiler's per-launch overhead made fp8's walls unreadable), then fp8 throughput.
  L=$OUT/logs; mkdir -p $L
  LAT="python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --quantization fp8 --out $OUT/results.jsonl"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   $TP > $L/tp_bf16.log 2>&1
   python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 12 --batch 1 256 --out-dir /tmp/p1 --out $OUT/results.jsonl > $L/prof_bf16.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   $LAT > $L/lat_fp8_w8a8.log 2>&1
   JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16 $LAT > $L/lat_fp8_w8a16.log 2>&1
   JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16 $TP --quantization fp8 > $L/tp_fp8.log 2>&1") &
  wait
  show_logs 6 ;;
launch)  # nvidia-h200-x2, one call: GPU0 fp8 throughput (W8A8, then fp8 KV), GPU1 the host
  # cost per kernel launch with and without XLA's command buffers, and batch-1 latency without
  # them (is the fp8 step's host gap launch cost?)
  L=$OUT/logs; mkdir -p $L
  TP="python3 benchmarks/throughput.py --engine jaxllm --workload fixed --repeats 1 --quantization fp8 --out $OUT/results.jsonl"
  LAT="python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  NOCB=--xla_gpu_enable_command_buffer=
  (export CUDA_VISIBLE_DEVICES=0 JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16
   timeout $T bash -c "
   $TP > $L/tp_fp8.log 2>&1
   $TP --kv-cache-dtype fp8 > $L/tp_fp8kv.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   for f in '' $NOCB --xla_gpu_graph_min_graph_size=1; do
     XLA_FLAGS=\$f python3 benchmarks/gpu/launch_cost.py >> $OUT/results.jsonl 2>> $L/launch.log
   done
   XLA_FLAGS=$NOCB $LAT > $L/lat_bf16_nocb.log 2>&1
   XLA_FLAGS=$NOCB JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=16 $LAT --quantization fp8 > $L/lat_fp8_nocb.log 2>&1") &
  wait
  grep launch_cost -A0 $OUT/results.jsonl; grep us_per_kernel $OUT/results.jsonl
  show_logs 4 ;;
eager)  # nvidia-h200-x2, one call: what enforce_eager (no command buffers) costs or gains
  # beyond batch 1, and where the fp8 step's host time goes. GPU0: bf16 profiles at batch 1 / 64
  # / 256 with and without command buffers (wall outside the profiler); GPU1: fp8 batch-1
  # profiles with both, host-side trace events printed and the traces kept.
  L=$OUT/logs; mkdir -p $L
  P="python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 8 --host-top 12 --out $OUT/results.jsonl"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   $P --batch 1 64 256 --out-dir /tmp/pa > $L/prof_bf16.log 2>&1
   $P --batch 1 64 256 --out-dir /tmp/pb --enforce-eager > $L/prof_bf16_eager.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   timeout 240 python3 benchmarks/kernels.py --sections backends --out $OUT/results.jsonl > $L/backends.log 2>&1
   $P --batch 1 --quantization fp8 --out-dir /tmp/pc --keep-trace $L/fp8_cb > $L/prof_fp8.log 2>&1
   $P --batch 1 --quantization fp8 --out-dir /tmp/pd --enforce-eager --keep-trace $L/fp8_eager > $L/prof_fp8_eager.log 2>&1") &
  wait
  for f in $L/*.log; do echo "=== $f"; quiet < $f | grep "^batch\|host\|^backends" | head -40; done
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
allreduce)  # nvidia-h200-x2, one call (issue 8: tp2 batch-1 latency is bound by 65 small
  # all-reduces a step, 66-150 us each in XLA). The all-reduce chain alone under XLA / NCCL
  # variants (collectives recorded into command buffers; NCCL's low-latency protocol), then tp2
  # decode with the default and with collectives in command buffers.
  CB=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES
  OS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel
  for v in "" "--xla_gpu_enable_command_buffer=$CB" "$OS=false" "$OS=false --xla_gpu_enable_command_buffer=$CB"; do
    for proto in "" LL; do
      env ${proto:+NCCL_PROTO=$proto} XLA_FLAGS="$v" timeout 60 python3 benchmarks/parallel.py --allreduce-only 2 2>&1 \
        | grep '^{' | sed "s/^{/{\"nccl_proto\": \"$proto\", /" | tee -a $OUT/results.jsonl
    done
  done
  for v in "" "--xla_gpu_enable_command_buffer=$CB"; do
    XLA_FLAGS="$v" timeout 200 python3 benchmarks/parallel.py --configs tp2 --num-prompts 64 \
      --repeats 2 --out $OUT/results.jsonl 2>&1 | quiet | tail -3
  done ;;
cbupdate)  # nvidia-h200-x2, one call: the fp8 batch-1 step spends ~1.3 ms of host time a step
  # in command_buffer::update (trace of 2026-12-01): XLA re-records every command whose buffer
  # addresses changed, and the step's temp buffers move between executions. SKIP_TEMP gives
  # them fixed virtual addresses (VMM allocator). GPU0: profiles default vs SKIP_TEMP; GPU1:
  # latency.py (the figure we report) default vs SKIP_TEMP, with per-step walls.
  L=$OUT/logs; mkdir -p $L
  ST=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  P="timeout 200 python3 benchmarks/profile_step.py --context 1024 --steps 30 --top 4 --host-top 14 --out $OUT/results.jsonl"
  LAT="timeout 200 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   XLA_FLAGS=$ST $P --batch 1 --quantization fp8 --out-dir /tmp/pa --keep-trace $L/fp8_skiptemp > $L/prof_fp8_skiptemp.log 2>&1
   XLA_FLAGS=$ST $P --batch 1 256 --out-dir /tmp/pb > $L/prof_bf16_skiptemp.log 2>&1
   $P --batch 1 --quantization fp8 --out-dir /tmp/pc > $L/prof_fp8.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   XLA_FLAGS=$ST $LAT > $L/lat_bf16_skiptemp.log 2>&1
   XLA_FLAGS=$ST $LAT --quantization fp8 > $L/lat_fp8_skiptemp.log 2>&1
   $LAT > $L/lat_bf16.log 2>&1") &
  wait
  for f in $L/*.log; do echo "=== $f"; quiet < $f | grep "^batch\|command_buffer\|decode ctx\|TTFT\|KV\|pages\|Error\|error" | head -14; done
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
startup)  # nvidia-h200-x2, one call: where the 148 s cold start goes (issue 9) and fp8 vs
  # bf16 throughput at 256 seqs / 2048 tokens, where fp8 compiles in time (issue 6). The 15
  # start-up compiles of a profile run took 76 s on 32 threads, ~35 s each, against 4-6 s for
  # one alone: they do not overlap, and GEMM autotuning is the suspect. GPU0: defaults as they
  # are, then fp8 at 256/2048; GPU1: defaults without autotuning, then bf16 at 256/2048.
  L=$OUT/logs; mkdir -p $L
  SMALL="--max-num-seqs 256 --max-num-batched-tokens 2048"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   $TP > $L/tp_bf16.log 2>&1
   $TP $SMALL --quantization fp8 > $L/tp_fp8_small.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   XLA_FLAGS=--xla_gpu_autotune_level=0 $TP > $L/tp_bf16_noautotune.log 2>&1
   $TP $SMALL > $L/tp_bf16_small.log 2>&1") &
  wait
  show_logs 7 ;;
next2)  # nvidia-h200-x2, one call, for the session after 2026-12-01: GPU0 the prefill block
  # sweep (our prefill kernel is 1.7-2.8x slower than JAX's Triton / cuDNN: its table entry
  # was never swept past the first config; masked_tail_only on and off); GPU1 the cold start
  # at the defaults with the nested
  # attention jit (lowering was 67.5 s of the 85 s), then fp8 at the defaults.
  L=$OUT/logs; mkdir -p $L
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   python3 benchmarks/kernels.py --sections prefill --budget 400 --device-time --out $OUT/results.jsonl > $L/prefill.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   $TP > $L/tp_bf16.log 2>&1
   $TP --quantization fp8 > $L/tp_fp8.log 2>&1") &
  wait
  show_logs 12 ;;
next3)  # nvidia-h200-x2, one call, after next2: GPU0 the decode sweep with GPU time per call
  # (kernels.py --device-time: is 8 x 4k at 44% of bandwidth the kernel, or the ~30 us a call
  # every implementation showed at 1 x 512?); GPU1 batch-1 latency (gap 2: 84% of the roofline)
  # with the table, with the decode split by pages, and with the K/V write fused into the
  # decode kernel (JAXLLM_ATTENTION_KNOBS; a full-cache copy per layer, if XLA inserted one for
  # the aliased pages, would show as a far slower step).
  L=$OUT/logs; mkdir -p $L
  LAT="timeout 170 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   python3 benchmarks/kernels.py --sections decode --budget 420 --device-time --out $OUT/results.jsonl > $L/decode.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   $LAT > $L/lat_table.log 2>&1
   JAXLLM_ATTENTION_KNOBS='{\"decode_split_pages\": true}' $LAT > $L/lat_split_pages.log 2>&1
   JAXLLM_ATTENTION_KNOBS='{\"fused_kv_write\": true}' $LAT > $L/lat_fused_kv_write.log 2>&1") &
  wait
  show_logs 14 ;;
next4)  # nvidia-h200-x2, one call (issues 5, 6, 9): GPU0 the GEMM sweep in GPU time (fp8 vs
  # bf16 at M 1..4096, the engine's own fp8 projection included: the 1.7x / 1.3x targets were
  # judged on host wall times); GPU1 whether the host idles the GPU (profile_step's
  # host_wait_ms / host_bound_steps beside idle_pct) for bf16 at batch 1 / 256 and fp8 at
  # batch 1, then fp8 batch-1 latency.
  L=$OUT/logs; mkdir -p $L
  P="python3 benchmarks/profile_step.py --context 1024 --steps 20 --top 6 --out $OUT/results.jsonl"
  (export CUDA_VISIBLE_DEVICES=0
   timeout $T bash -c "
   python3 benchmarks/kernels.py --sections gemm --budget 420 --device-time --out $OUT/results.jsonl > $L/gemm.log 2>&1") &
  (export CUDA_VISIBLE_DEVICES=1
   timeout $T bash -c "
   timeout 200 $P --batch 1 256 --out-dir /tmp/p4a > $L/prof_bf16.log 2>&1
   timeout 150 $P --batch 1 --quantization fp8 --out-dir /tmp/p4b > $L/prof_fp8.log 2>&1
   timeout 170 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --quantization fp8 --out $OUT/results.jsonl > $L/lat_fp8.log 2>&1") &
  wait
  show_logs 14 ;;
fp8tp)  # nvidia-h200, two calls back to back (the machine stays warm 30 s, and /tmp/jaxcache
  # with it): fp8 offline throughput at the default batch limits. The first call's compiles are
  # cached as each finishes even if the lane times out; the second starts warm.
  timeout ${T} python3 benchmarks/throughput.py --engine jaxllm --workload fixed --repeats 1 \
    --quantization fp8 --out $OUT/results.jsonl 2>&1 | quiet | tail -12 ;;
throughput)  # nvidia-h200, one call: 1,000 x 512/128 at vLLM's H100/H200 batch defaults (1024
  # sequences, 16384 tokens a step) against the 256 / 2048 of the 2026-11-30 table
  timeout 560 python3 benchmarks/throughput.py --engine jaxllm --workload fixed --repeats 2 \
    --out $OUT/throughput.jsonl 2>&1 | quiet | tail -8 ;;
b1)  # nvidia-h200 (one GPU), one call of ~8 min (issue 9, gap 2: batch-1 decode at 84% of the
  # roofline). The logits GEMM alone in GPU time ([E, V] vs [V, E], float32 vs bf16 out), then
  # batch-1 latency four ways: the defaults, the K/V write fused into the decode kernel, bf16
  # logits, the decode split by pages; then the host wait at batch 1 / 256 (gap 4).
  L=$OUT/logs; mkdir -p $L
  LAT="timeout 120 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  timeout 90 python3 benchmarks/kernels.py --sections lm_head --device-time --out $OUT/results.jsonl > $L/lm_head.log 2>&1
  $LAT > $L/lat_default.log 2>&1
  JAXLLM_ATTENTION_KNOBS='{"fused_kv_write": true}' $LAT > $L/lat_fused_kv_write.log 2>&1
  JAXLLM_LOGITS_GEMM_OUT=model $LAT > $L/lat_logits_bf16.log 2>&1
  JAXLLM_ATTENTION_KNOBS='{"decode_split_pages": true}' $LAT > $L/lat_split_pages.log 2>&1
  timeout 150 python3 benchmarks/profile_step.py --context 1024 --steps 20 --top 6 --batch 1 256 \
    --out-dir /tmp/pb1 --out $OUT/results.jsonl > $L/prof_bf16.log 2>&1
  grep -h "lm_head" $L/lm_head.log | grep -v "^ *$" | tail -20
  show_logs 10 ;;
sweep1)  # nvidia-h200 (one GPU), one call: the decode shapes no GPU-time sweep has reached yet
  # (1 x 512, 64 x 32k; the others ran 2026-12-01 morning and noon), then bf16 throughput at
  # the defaults with the decode table they changed.
  L=$OUT/logs; mkdir -p $L
  timeout 250 python3 benchmarks/kernels.py --sections decode --decode-shapes 1x512,64x32768 \
    --budget 200 --device-time --out $OUT/results.jsonl > $L/decode.log 2>&1
  timeout 270 $TP > $L/tp_bf16.log 2>&1
  show_logs 16 ;;
lmhead)  # nvidia-h200 (one GPU), one call, run 2026-12-01: was the batch-1 step's logits GEMM
  # slower than alone (0.47 ms op group vs 0.23 ms)? Tests what XLA fuses into it
  # (lm_head_step.py) and concurrent autotuning (the step's HLO config vs the lone one's;
  # latency compiled on one thread). Answer: neither; the op group was a deduplicated name
  # (RESULTS.md). Then the decode sweep (issue 5).
  L=$OUT/logs; mkdir -p $L
  LAT="timeout 120 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  timeout 90 python3 benchmarks/gpu/lm_head_step.py --out $OUT/results.jsonl > $L/lm_head_step.log 2>&1
  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*forward.*" \
    $LAT > $L/lat_dump.log 2>&1
  for f in /tmp/dump/*after_optimizations.txt; do
    echo "== $f"; grep "f32\[8,128256\]" $f | grep "fusion(\|custom-call(" | cut -c1-700
  done > $L/step_gemm_configs.log 2>&1
  JAXLLM_COMPILE_WORKERS=1 $LAT > $L/lat_one_thread.log 2>&1
  timeout 240 python3 benchmarks/kernels.py --sections decode --decode-shapes 8x4096,64x4096,256x4096,1x32768 \
    --budget 170 --device-time --out $OUT/results.jsonl > $L/decode.log 2>&1
  cat $L/lm_head_step.log; cat $L/step_gemm_configs.log | cut -c1-600
  show_logs 8 ;;
b1why)  # nvidia-h200 (one GPU), one call: the bf16 batch-1 profile (2026-12-01) has one op
  # group "gemm_fusion_dot" at 0.47 ms a step, and the logits GEMM is not it (that one is a
  # gemm_fusion_dot_general, 0.23 ms). Its calls per step and its HLO line; then fp8 batch 1.
  L=$OUT/logs; mkdir -p $L
  P="timeout 150 python3 benchmarks/profile_step.py --context 1024 --steps 20 --top 10 --batch 1 --out $OUT/results.jsonl"
  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*forward.*" \
    $P --out-dir /tmp/pa > $L/prof_bf16.log 2>&1
  for f in /tmp/dump/*forward*after_optimizations.txt; do
    echo "== $f $(grep -c 'gemm_fusion' $f) gemm fusions"
    grep -E "^ *(ROOT )?%gemm_fusion_dot(\.[0-9]+)? = " $f | head -4 | cut -c1-420
  done > $L/gemm_fusion_dot.log 2>&1
  $P --out-dir /tmp/pb --quantization fp8 > $L/prof_fp8.log 2>&1
  timeout 150 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 \
    --quantization fp8 --out $OUT/results.jsonl > $L/lat_fp8.log 2>&1
  head -c 6000 $L/gemm_fusion_dot.log
  show_logs 14 ;;
b1hlo)  # nvidia-h200 (one GPU), one call: the ~350 small kernels of the batch-1 step (issue 9)
  # and the fp8 step's GEMMs (issue 6), named: keep.tgz holds each trace and the optimized HLO
  # of the forward programs; off the device, gpu_trace.gpu_events lists a step's kernels in
  # launch order and the HLO says which fusion each is (RESULTS, "Rerun of 2026-12-01 (noon)").
  L=$OUT/logs; mkdir -p $L /tmp/keep
  for q in bf16 fp8; do
    QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    XLA_FLAGS="--xla_dump_to=/tmp/dump_$q --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*forward.*" \
      timeout 230 python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 40 --batch 1 \
      --max-num-seqs 8 $QA --out-dir /tmp/p_$q --keep-trace /tmp/keep/trace_$q \
      --out $OUT/results.jsonl > $L/prof_$q.log 2>&1
    mkdir -p /tmp/keep/hlo_$q; cp /tmp/dump_$q/*after_optimizations.txt /tmp/keep/hlo_$q/ 2>/dev/null
  done
  tar czf $OUT/keep.tgz -C /tmp keep
  left=$((T - SECONDS - 20)); [ $left -gt 60 ] && timeout $left python3 benchmarks/kernels.py \
    --sections decode --decode-shapes 8x512,64x512,256x512,1x4096,8x32768 --budget $((left - 40)) \
    --device-time --out $OUT/results.jsonl > $L/decode.log 2>&1
  ls -la $OUT; show_logs 50 ;;
b1small)  # nvidia-h200 (one GPU), one call (issue 9): a batch-1 decode step in an engine of 8
  # sequence slots ran the attention sized for 8 (8.3 us a layer, 1.9x the kernel's best for one
  # sequence) and its GEMMs on 8 rows; small_decode_buckets gives it a 1-row program. (Run
  # 2026-12-01 noon, when the buckets were on by default on a GPU; now off, so named here.)
  L=$OUT/logs; mkdir -p $L /tmp/keep
  LAT="timeout 150 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 5 --out $OUT/results.jsonl"
  $LAT --small-decode-buckets 1,2,4 > $L/lat_small.log 2>&1
  $LAT --small-decode-buckets none > $L/lat_none.log 2>&1
  $LAT --small-decode-buckets 1,2,4 > $L/lat_small2.log 2>&1
  timeout 150 python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 40 --batch 1 \
    --max-num-seqs 8 --small-decode-buckets 1,2,4 --out-dir /tmp/p1 \
    --keep-trace /tmp/keep/trace_small --out $OUT/results.jsonl > $L/prof_small.log 2>&1
  tar czf $OUT/keep.tgz -C /tmp keep
  timeout 220 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 \
    --quantization fp8 --small-decode-buckets 1,2,4 --out $OUT/results.jsonl > $L/lat_fp8.log 2>&1
  grep -h "^    " $L/prof_small.log | head -30
  show_logs 12 ;;
b1prof)  # nvidia-h200 (one GPU), one call: b1small's batch-1 steps were slower than the
  # morning's with and without the small buckets (4.65-4.72 ms median, fp8 4.07): where the time
  # goes (GPU busy, host wait, kernels) with the small buckets and without, and the clocks.
  L=$OUT/logs; mkdir -p $L /tmp/keep
  nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $L/smi_before.log 2>&1
  P="timeout 120 python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 40 --batch 1 --max-num-seqs 8 --host-top 25 --out $OUT/results.jsonl"
  $P --out-dir /tmp/pa --keep-trace /tmp/keep/trace_small --small-decode-buckets 1,2,4 > $L/prof_small.log 2>&1
  $P --out-dir /tmp/pb --keep-trace /tmp/keep/trace_none --small-decode-buckets none > $L/prof_none.log 2>&1
  timeout 200 $P --out-dir /tmp/pc --keep-trace /tmp/keep/trace_fp8 --quantization fp8 \
    --small-decode-buckets 1,2,4 > $L/prof_fp8.log 2>&1
  nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > $L/smi_after.log 2>&1
  tar czf $OUT/keep.tgz -C /tmp keep
  for f in $L/prof_*.log; do echo "== $f"; grep -h "^batch\|^    " $f | head -24; done
  show_logs 4 ;;
fp8one)  # nvidia-h200 (one GPU), one call (issue 6): fp8 batch-1 latency, fp8 throughput at
  # the defaults (1024 sequences / 16384 tokens a step).
  L=$OUT/logs; mkdir -p $L
  timeout 120 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 \
    --quantization fp8 --out $OUT/results.jsonl > $L/lat_fp8.log 2>&1
  timeout 400 $TP --quantization fp8 > $L/tp_fp8.log 2>&1
  show_logs 12 ;;
fp8def)  # nvidia-h200 (one GPU), one call (issues 6 and 5): fp8 offline throughput at the
  # defaults (1024 sequences / 16384 tokens), with the large buckets' fp8 GEMMs on cuBLAS(Lt)
  # (the 16384-token sizing compile took 306 s with Triton's autotuning; run 2026-12-01 when
  # the threshold was 2048 tokens, now 32); then the decode shapes 1 x 512 and 64 x 32k.
  L=$OUT/logs; mkdir -p $L
  timeout 380 $TP --quantization fp8 > $L/tp_fp8.log 2>&1
  left=$((T - SECONDS - 20)); [ $left -gt 60 ] && timeout $left python3 benchmarks/kernels.py \
    --sections decode --decode-shapes 1x512,64x32768 --budget $((left - 40)) --device-time \
    --out $OUT/results.jsonl > $L/decode.log 2>&1
  grep -h "sized\|start-up\|compiled\|tok/s" $L/tp_fp8.log | cut -c1-400
  show_logs 14 ;;
tpdef)  # nvidia-h200 (one GPU), one call (issues 6 and 9): offline throughput at the defaults,
  # bf16, then fp8 with cuBLAS(Lt) GEMMs from 32 tokens (the first W8A8 bucket; the 2048
  # default left 100+ s of Triton autotuning at 128-1024 tokens), then fp8 + fp8 KV the same.
  L=$OUT/logs; mkdir -p $L
  timeout 250 $TP > $L/tp_bf16.log 2>&1
  export JAXLLM_FP8_CUBLAS_MIN_TOKENS=${MIN_TOKENS:-32}
  timeout 200 $TP --quantization fp8 > $L/tp_fp8.log 2>&1
  timeout $((T - SECONDS - 15)) $TP --quantization fp8 --kv-cache-dtype fp8 > $L/tp_fp8kv.log 2>&1
  grep -h "sized\|start-up\|compiled\|tok/s" $L/*.log | cut -c1-400
  show_logs 10 ;;
fp8out)  # nvidia-h200 (one GPU), one call (issue 6: fp8 throughput 1.40x bf16, target 1.5x):
  # the W8A8 GEMM's fp32 output, read back by the scale epilogue, against a bf16 one
  # (JAXLLM_FP8_GEMM_OUT=model), twice each, interleaved.
  L=$OUT/logs; mkdir -p $L
  for i in 1 2; do
    timeout 120 $TP --quantization fp8 > $L/tp_fp8_f32_$i.log 2>&1
    JAXLLM_FP8_GEMM_OUT=model timeout 120 $TP --quantization fp8 > $L/tp_fp8_bf16_$i.log 2>&1
  done
  grep -h "tok/s" $L/*.log | cut -c1-330
  show_logs 4 ;;
fp8kv)  # nvidia-h200 (one GPU), one call (issue 6): the fp8 KV cache made the fp8 offline
  # throughput slower (9,483 against 9,844 tok/s), where it halves the bytes a decode step's
  # attention reads. The decode kernel over e4m3 pages against bf16 pages (GPU time; the bf16
  # run keeps the table's entry alone), then the batch-256 fp8 step with each cache.
  L=$OUT/logs; mkdir -p $L
  SH=8x4096,64x4096,256x512,256x4096
  timeout 170 python3 benchmarks/kernels.py --sections decode --decode-shapes $SH --budget 130 \
    --device-time --kv-dtype fp8 --out $OUT/results.jsonl > $L/decode_fp8.log 2>&1
  timeout 100 python3 benchmarks/kernels.py --sections decode --decode-shapes $SH --budget 1 \
    --device-time --out $OUT/results.jsonl > $L/decode_bf16.log 2>&1
  P="python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 8 --batch 256 --quantization fp8 --out $OUT/results.jsonl"
  timeout 110 $P --out-dir /tmp/pa > $L/prof_fp8.log 2>&1
  timeout $((T - SECONDS - 10)) $P --out-dir /tmp/pb --kv-cache-dtype fp8 > $L/prof_fp8kv.log 2>&1
  for f in $L/decode_*.log; do echo "== $f"; sed -n '/best per shape/,$p' $f | head -14; done
  for f in $L/prof_*.log; do echo "== $f"; grep -h "^batch\|^    " $f | head -12; done
  show_logs 3 ;;
kvwrite)  # nvidia-h200 (one GPU), one call, for the session after 2026-12-01 evening (issues 6,
  # 9): the K/V writes as a scatter with unique indices (the default since; XLA stores instead
  # of an atomic read-modify-write per value) against JAXLLM_KV_WRITE_UNIQUE=0, in fp8 + fp8 KV
  # and bf16 throughput (interleaved), then the fp8 prefill step's profile with it.
  L=$OUT/logs; mkdir -p $L
  timeout 100 $TP --quantization fp8 --kv-cache-dtype fp8 > $L/tp_fp8kv_unique.log 2>&1
  JAXLLM_KV_WRITE_UNIQUE=0 timeout 100 $TP --quantization fp8 --kv-cache-dtype fp8 \
    > $L/tp_fp8kv_atomic.log 2>&1
  timeout 100 $TP > $L/tp_bf16_unique.log 2>&1
  JAXLLM_KV_WRITE_UNIQUE=0 timeout 100 $TP > $L/tp_bf16_atomic.log 2>&1
  tp_rows
  timeout 100 python3 benchmarks/profile_step.py --out-dir /tmp/prof --top 16 --out $OUT/prof.jsonl \
    --prefill-tokens 16384 --context 512 --steps 3 --quantization fp8 > $L/prefill_fp8.log 2>&1
  grep -A17 "^prefill " $L/prefill_fp8.log | cut -c1-150
  show_logs 3 ;;
hp)  # nvidia-h200 (one GPU), one call (issues 5, 6): the decode kernel with several KV heads a
  # program (decode_heads_per_program: block-diagonal q rows, one softmax over hp heads, K/V
  # tiles hp heads wide), swept in GPU time over fp8 pages at the fp8 table's shapes and over
  # bf16 pages at two; then fp8 + fp8 KV throughput with the best hp > 1 config at 1024 x 640
  # (the offline workload's decode steps) as knobs, the default, and the knobs with the W8A8
  # GEMM writing bf16 (JAXLLM_FP8_GEMM_OUT=model: half the bytes the prefill step's SwiGLU
  # fusions read).
  L=$OUT/logs; mkdir -p $L
  K="python3 benchmarks/kernels.py --sections decode --device-time --decode-variants hp --budget 400 --out $OUT/kernels.jsonl"
  timeout 200 $K --kv-dtype fp8 --fp8-kv-dot float16 \
    --decode-shapes 1024x640,256x512,256x4096,64x4096 > $L/sweep_fp8.log 2>&1
  timeout 80 $K --decode-shapes 1024x640,256x4096 > $L/sweep_bf16.log 2>&1
  KN=$(python3 - $OUT/kernels.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    c = r.get("config")
    if r.get("impl") == "pallas" and isinstance(c, dict):
        print(r["batch"], r["ctx"], r.get("kv_dtype", "bf16"), c.get("decode_heads_per_program", 1),
              c["decode_pages_per_block"], c["decode_splits"], c["num_warps"], r.get("ok"),
              round(r.get("device_us", -1), 1), round(r.get("pct_bw_device", -1)), file=sys.stderr)
cand = [r for r in rows if r.get("impl") == "pallas" and r.get("ok") and r.get("batch") == 1024
        and r.get("kv_dtype") == "fp8" and r["config"].get("decode_heads_per_program", 1) > 1
        and r["config"]["num_warps"] == 4 and "device_us" in r]
if cand:
    c = min(cand, key=lambda r: r["device_us"])["config"]
    print(json.dumps({k: c[k] for k in ("decode_heads_per_program", "decode_pages_per_block",
                                         "decode_splits")}))
PY
)
  echo "knobs: $KN"
  F8="$TP --quantization fp8 --kv-cache-dtype fp8"
  JAXLLM_ATTENTION_KNOBS="$KN" timeout 100 $F8 > $L/tp_fp8kv_hp.log 2>&1
  timeout 100 $F8 > $L/tp_fp8kv_default.log 2>&1
  JAXLLM_ATTENTION_KNOBS="$KN" JAXLLM_FP8_GEMM_OUT=model timeout 100 $F8 > $L/tp_fp8kv_hp_bf16out.log 2>&1
  tp_rows
  show_logs 2 ;;
confirm)  # nvidia-h200 (one GPU), one call (issue 6), after hp: the new defaults (the fp8 decode
  # table's two KV heads a program, the W8A8 GEMM writing bf16) against bf16 in the same call,
  # fp8 + fp8 KV twice, the GEMM's float32 output once between them (the A/B of that default),
  # fp8 alone, and bf16 again if the call has time.
  L=$OUT/logs; mkdir -p $L
  F8="$TP --quantization fp8 --kv-cache-dtype fp8"
  S0=$SECONDS
  timeout 100 $F8 > $L/tp_fp8kv_1.log 2>&1
  timeout 100 $TP > $L/tp_bf16_1.log 2>&1
  JAXLLM_FP8_GEMM_OUT=float32 timeout 100 $F8 > $L/tp_fp8kv_f32out.log 2>&1
  timeout 100 $F8 > $L/tp_fp8kv_2.log 2>&1
  timeout 100 $TP --quantization fp8 > $L/tp_fp8.log 2>&1
  [ $((SECONDS - S0)) -lt 420 ] && timeout 95 $TP > $L/tp_bf16_2.log 2>&1
  tp_rows
  show_logs 2 ;;
gputests)  # nvidia-h200 (one GPU), one call: the GPU tests (tests/test_gpu.py: the compiled
  # kernels against their references, several KV heads a decode program included, and the
  # engine's fp8 path), then bf16 batch-1 latency (issue 9) with the unique-slot K/V scatter.
  # Carry .bench (the saved tokenizer).
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 170 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py > $L/gpu_tests.log 2>&1
  grep -v "^\s*$" $L/gpu_tests.log | tail -8
  timeout 120 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 \
    --repeats 3 --out $OUT/results.jsonl > $L/lat_bf16.log 2>&1
  show_logs 4 ;;
swiglu)  # nvidia-h200 (one GPU), one call (issue 6): the fp8 MLP's fused SwiGLU + quantization
  # kernel (pallas_kernels/silu_mul_quant.py): correct and timed against XLA on the GPU, then
  # fp8 throughput with it (JAXLLM_FP8_FUSED_SWIGLU=1; it was the GPU default when this ran,
  # off since) and without, interleaved, and with a bf16 gate/up GEMM output (half the bytes
  # the kernel reads); then the fp8 prefill step's profile with it.
  L=$OUT/logs; mkdir -p $L
  timeout 60 python3 benchmarks/gpu/swiglu_quant.py 2>&1 | tee $L/swiglu_kernel.log | tail -6
  ON="env JAXLLM_FP8_FUSED_SWIGLU=1"
  $ON timeout 100 $TP --quantization fp8 > $L/tp_fp8_fused_1.log 2>&1
  timeout 100 $TP --quantization fp8 > $L/tp_fp8_unfused.log 2>&1
  $ON timeout 100 $TP --quantization fp8 > $L/tp_fp8_fused_2.log 2>&1
  $ON JAXLLM_FP8_GEMM_OUT=model timeout 100 $TP --quantization fp8 > $L/tp_fp8_fused_bf16out.log 2>&1
  tp_rows
  $ON timeout 100 python3 benchmarks/profile_step.py --out-dir /tmp/prof --top 16 --out $OUT/prof.jsonl \
    --prefill-tokens 16384 --context 512 --steps 3 --quantization fp8 > $L/prefill_fp8.log 2>&1
  grep -A17 "^prefill " $L/prefill_fp8.log | cut -c1-150
  show_logs 3 ;;
swiglu2)  # the same kernel's tiles (swiglu found 2048 channels x 4 warps 12x slower than XLA),
  # then fp8 throughput with it on at the default tile (512 channels when this ran; 256 since)
  L=$OUT/logs; mkdir -p $L
  timeout 90 python3 benchmarks/gpu/swiglu_quant.py 2>&1 | tee $L/swiglu_kernel.log | tail -21
  JAXLLM_FP8_FUSED_SWIGLU=1 timeout 100 $TP --quantization fp8 > $L/tp_fp8_fused.log 2>&1
  tp_rows
  show_logs 2 ;;
swiglu3)  # nvidia-h200 (one GPU), one call (issue 6): the SwiGLU + quantization kernel with
  # contiguous [rows, chunk, 2] tiles against XLA, swept; if its best tile at 16384 x bf16 beats
  # XLA at all, fp8 + fp8 KV throughput with it (JAXLLM_FP8_FUSED_SWIGLU=1 and that tile) and without,
  # interleaved, then the fp8 prefill step's profile with it. (Its first run, of a kernel
  # holding each whole row in registers, found that 4-6x slower than XLA.)
  L=$OUT/logs; mkdir -p $L; S0=$SECONDS
  swiglu_sweep 1.0 36
  if [ -n "$BEST" ]; then
    F8="$TP --quantization fp8 --kv-cache-dtype fp8"
    ON="env JAXLLM_FP8_FUSED_SWIGLU=1 JAXLLM_FP8_SWIGLU_TILE=$BEST"
    $ON timeout 100 $F8 > $L/tp_fp8kv_fused_1.log 2>&1
    timeout 100 $F8 > $L/tp_fp8kv_unfused.log 2>&1
    $ON timeout 100 $F8 > $L/tp_fp8kv_fused_2.log 2>&1
    tp_rows
    [ $((SECONDS - S0)) -lt 450 ] && $ON timeout 100 python3 benchmarks/profile_step.py \
      --out-dir /tmp/prof --top 16 --out $OUT/prof.jsonl --prefill-tokens 16384 --context 512 \
      --steps 3 --quantization fp8 > $L/prefill_fp8.log 2>&1
    grep -A17 "^prefill " $L/prefill_fp8.log | cut -c1-150
  fi
  show_logs 3 ;;
night)  # nvidia-h200 (one GPU), one call, 2026-12-01 20:27 rerun: the SwiGLU kernel's tiles with
  # Triton's pipeliner (stages > 1); if one beats XLA by 20%, fp8 + fp8 KV throughput with it
  # and without; then the GPU tests (the new skinny-matmul and SwiGLU cases). Carry .bench.
  L=$OUT/logs; mkdir -p $L
  swiglu_sweep 0.8 17
  if [ -n "$BEST" ]; then
    F8="$TP --quantization fp8 --kv-cache-dtype fp8"
    JAXLLM_FP8_FUSED_SWIGLU=1 JAXLLM_FP8_SWIGLU_TILE=$BEST timeout 100 $F8 \
      > $L/tp_fp8kv_fused.log 2>&1
    timeout 100 $F8 > $L/tp_fp8kv_unfused.log 2>&1
    tp_rows
  fi
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 200 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py > $L/gpu_tests.log 2>&1
  grep -v "^\s*$" $L/gpu_tests.log | tail -8
  show_logs 3 ;;
swiglul2)  # nvidia-h200 (one GPU), one short call: the SwiGLU kernel's second walk re-reads its
  # rows. At 8 warps a program up to 8 programs an SM are resident: ~1,000 rows x 57 KB = 60 MB,
  # over the 50 MB L2, so the re-read comes from DRAM. 16-32 warps a program keep 2-4 programs an
  # SM: the rows in flight fit the L2. If a tile beats XLA by 20%, one fp8 + fp8 KV throughput
  # run with it (the unfused baseline: the same day's swiglu3 calls, 11,103-11,171 tok/s).
  L=$OUT/logs; mkdir -p $L
  swiglu_sweep 0.8 7 --ts 16384 \
    --variants "1,2048,16,1;1,1024,16,1;2,1024,16,1;1,2048,32,1;1,1024,32,1;2,1024,8,1"
  if [ -n "$BEST" ]; then
    JAXLLM_FP8_FUSED_SWIGLU=1 JAXLLM_FP8_SWIGLU_TILE=$BEST timeout 110 $TP --quantization fp8 \
      --kv-cache-dtype fp8 > $L/tp_fp8kv_fused.log 2>&1
    tp_rows
  fi
  show_logs 2 ;;
swiglu4)  # nvidia-h200 (one GPU), one short call: the SwiGLU kernel loading each tile as [rows,
  # 2 x chunk] (offsets Triton can prove contiguous: vector loads) and reshaping it, against the
  # [rows, chunk, 2] addressing of swiglu3 (flat=0, in the same call) and XLA; if a flat tile
  # beats XLA by 20%, one fp8 + fp8 KV throughput run with it (the unfused baseline: the same
  # day's swiglu3 calls, 11,103-11,171 tok/s).
  L=$OUT/logs; mkdir -p $L
  swiglu_sweep 0.8 8 --ts 16384 --variants \
    "2,1024,8,1,0;2,1024,8,1,1;1,2048,8,1,1;1,1024,4,1,1;2,512,4,1,1;4,512,8,1,1;1,2048,8,2,1"
  if [ -n "$BEST" ]; then
    JAXLLM_FP8_FUSED_SWIGLU=1 JAXLLM_FP8_SWIGLU_TILE=$BEST timeout 110 $TP --quantization fp8 \
      --kv-cache-dtype fp8 > $L/tp_fp8kv_fused.log 2>&1
    tp_rows
  fi
  show_logs 2 ;;
cbupd)  # nvidia-h200 (one GPU), one short call (issues 6, 9): which buffers of the batch-1
  # step move between launches and what XLA's command-buffer updates cost (cb_update.py): fp8
  # with XLA's update log, then fp8 and bf16 without it (the log costs host time).
  L=$OUT/logs; mkdir -p $L
  CB="python3 benchmarks/gpu/cb_update.py --out $OUT/cb.jsonl"
  timeout 170 $CB --quantization fp8 --vlog > $L/cb_fp8_vlog.log 2> $L/vlog_fp8.txt
  python3 benchmarks/gpu/cb_update.py summarize $L/vlog_fp8.txt > $L/cb_fp8_vlog_summary.log
  timeout 150 $CB --quantization fp8 > $L/cb_fp8.log 2>&1
  timeout 150 $CB > $L/cb_bf16.log 2>&1
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(k, v) for k, v in sorted(d.items()) if not k.endswith('-done')]" $L/cb_fp8_vlog_summary.log
  rm $L/vlog_fp8.txt
  show_logs 8 ;;
swigluab)  # nvidia-h200 (one GPU), one call (issue 6): the flat-tile SwiGLU kernel in the
  # engine (0.67 ms alone against XLA's 0.77 at 16384 x 14336, swiglu4): fp8 + fp8 KV throughput
  # with JAXLLM_FP8_FUSED_SWIGLU=1 and without, twice each, interleaved.
  L=$OUT/logs; mkdir -p $L
  F8="$TP --quantization fp8 --kv-cache-dtype fp8"
  for i in 1 2; do
    timeout 130 $F8 > $L/tp_fp8kv_unfused_$i.log 2>&1
    JAXLLM_FP8_FUSED_SWIGLU=1 timeout 130 $F8 > $L/tp_fp8kv_fused_$i.log 2>&1
  done
  tp_rows
  show_logs 2 ;;
multistep)  # nvidia-h200 (one GPU), one call (issues 6, 9): multi-step decode
  # (num_scheduler_steps). The fp8 batch-1 step is bound by the host (cbupd: each launch's
  # command-buffer update, ~0.4-1 ms, and the launch); k steps a launch pay it once per k tokens.
  # The GPU test, then fp8 batch-1 latency with 1, 4 and 8 steps a launch.
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py -k multi_step > $L/gpu_tests.log 2>&1
  grep -v "^\s*$" $L/gpu_tests.log | tail -3
  for k in 1 4 8; do
    timeout 130 $LAT1K --quantization fp8 --num-scheduler-steps $k > $L/lat_fp8_k$k.log 2>&1
    grep "decode ctx\|TTFT" $L/lat_fp8_k$k.log
  done
  show_logs 2 ;;
multistep2)  # nvidia-h200 (one GPU), one call: multi-step decode, bf16 batch 1 (8B) and the
  # default model's shape (SmolLM2-135M: a host-bound step), 1 step a launch against 4 / 8.
  # fp8 once more at 1 and 4, around bf16 (multistep's 1-step fp8 run was slow: 5.97 ms/token).
  L=$OUT/logs; mkdir -p $L
  for run in fp8:1 bf16:1 bf16:4 fp8:4; do
    k=${run#*:}; q=${run%:*}; Q=; [ $q = fp8 ] && Q="--quantization fp8"
    timeout 120 $LAT1K $Q --num-scheduler-steps $k > $L/lat_${q}_k$k.log 2>&1
    grep "decode ctx\|TTFT" $L/lat_${q}_k$k.log
  done
  for k in 1 8; do
    timeout 90 $LAT1K --shape smollm2-135m --num-scheduler-steps $k > $L/lat_smol_k$k.log 2>&1
    grep "decode ctx\|TTFT" $L/lat_smol_k$k.log
  done
  show_logs 2 ;;
multistep3)  # nvidia-h200 (one GPU), one call: offline throughput (1,000 x 512/128) with 4 decode
  # steps a launch: fp8 + fp8 KV (one step a launch, this session: 10,926-10,974 tok/s), then bf16.
  L=$OUT/logs; mkdir -p $L
  timeout 200 $TP --quantization fp8 --kv-cache-dtype fp8 --num-scheduler-steps 4 \
    > $L/tp_fp8kv_k4.log 2>&1
  timeout 170 $TP --num-scheduler-steps 4 > $L/tp_bf16_k4.log 2>&1
  tp_rows
  show_logs 3 ;;
loopprof)  # nvidia-h200 (one GPU), one call (issues 6 and 9): the batch-1 multi-step program
  # (num_scheduler_steps = 4, GPU-bound: fp8 2.92, bf16 4.33 ms/token) kernel by kernel, per
  # token: profile, kept trace and optimized HLO of the multi-step programs, fp8 then bf16.
  L=$OUT/logs; mkdir -p $L /tmp/keep
  for q in fp8 bf16; do
    QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    XLA_FLAGS="--xla_dump_to=/tmp/dump_$q --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*multi.*" \
      timeout 240 python3 benchmarks/profile_step.py --context 1024 --steps 6 --top 40 --batch 1 \
      --max-num-seqs 8 --num-scheduler-steps 4 $QA --out-dir /tmp/p_$q \
      --keep-trace /tmp/keep/trace_$q --out $OUT/results.jsonl > $L/prof_$q.log 2>&1
    mkdir -p /tmp/keep/hlo_$q; cp /tmp/dump_$q/*after_optimizations.txt /tmp/keep/hlo_$q/ 2>/dev/null
  done
  tar czf $OUT/keep.tgz -C /tmp keep
  ls -la $OUT; show_logs 50 ;;
b1knobs)  # nvidia-h200 (one GPU), one call (issues 9 and 6): batch 1 in the multi-step loop
  # (num_scheduler_steps = 4) under attention knobs. loopprof showed the decode attention at
  # 8.8 us a layer (bf16): the 8-row bucket's table entry (8 pages x 5 splits) is sized for 8
  # sequences; the 1-row program's (10 splits) took 5.1. Also the K/V write fused into the
  # decode kernel (two scatters a layer fewer). bf16 profiles (wall per token, GPU per kernel).
  L=$OUT/logs; mkdir -p $L
  PS="timeout 110 python3 benchmarks/profile_step.py --context 1024 --steps 6 --top 16 --batch 1 --max-num-seqs 8 --num-scheduler-steps 4 --out $OUT/results.jsonl"
  i=0
  for knobs in '' '{"decode_splits": 10}' '{"decode_splits": 16, "decode_pages_per_block": 4}' \
      '{"fused_kv_write": true}' '{"fused_kv_write": true, "decode_splits": 16, "decode_pages_per_block": 4}'; do
    i=$((i + 1)); echo "variant $i: knobs '$knobs'" > $L/v$i.log
    JAXLLM_ATTENTION_KNOBS="$knobs" $PS ${QA:-} --out-dir /tmp/p$i >> $L/v$i.log 2>&1
  done
  for f in $L/v*.log; do head -1 $f; grep -A16 "^batch " $f | cut -c1-120; done
  show_logs 3 ;;
fkw)  # nvidia-h200 (one GPU), one call (issues 9 and 6): the K/V write fused into the decode
  # kernel as a default? b1knobs: -0.04..-0.07 ms a token at batch 1 in the multi-step loop
  # (bf16). latency.py with 4 steps a launch, bf16 and fp8, with and without it, then decode
  # steps of 64 and 256 sequences (one step a launch) with and without it.
  L=$OUT/logs; mkdir -p $L
  FKW='{"fused_kv_write": true}'
  lat_knobs_ab "$FKW" fkw 110
  PS="timeout 120 python3 benchmarks/profile_step.py --context 1024 --steps 8 --top 8 --batch 64 256 --out $OUT/results.jsonl"
  $PS --out-dir /tmp/p1 > $L/prof_b256.log 2>&1
  JAXLLM_ATTENTION_KNOBS="$FKW" $PS --out-dir /tmp/p2 > $L/prof_b256_fkw.log 2>&1
  for f in $L/lat_*.log; do echo "== $f"; grep "decode ctx\|TTFT" $f; done
  for f in $L/prof_*.log; do echo "== $f"; grep -A8 "^batch " $f | cut -c1-150; done
  show_logs 2 ;;
b256)  # nvidia-h200 (one GPU), one call (issue 9): decode steps of 256 sequences at 1k context,
  # bf16, with profile_step.py's fix (every sequence still decoding in the profiled steps; the
  # runs with --steps 10 before 2026-12-02 held fewer), with and without the fused K/V write.
  L=$OUT/logs; mkdir -p $L
  PS="timeout 200 python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 10 --batch 256 --out $OUT/results.jsonl"
  $PS --out-dir /tmp/p1 > $L/prof_b256.log 2>&1
  JAXLLM_ATTENTION_KNOBS='{"fused_kv_write": true}' $PS --out-dir /tmp/p2 > $L/prof_b256_fkw.log 2>&1
  for f in $L/prof_*.log; do echo "== $f"; grep -A10 "^batch " $f | cut -c1-150; done
  show_logs 4 ;;
rope)  # nvidia-h200 (one GPU), one call (issues 9 and 6): the decode kernel applying rope and
  # writing the new K/V from the fused q/k/v output as is (JAXLLM_ATTENTION_KNOBS
  # fused_qkv_rope: the q rope, k rope / v slice or K/V scatter kernels gone, three a layer).
  # Its GPU tests, the bf16 batch-1 loop profile with it, then latency.py with 4 steps a
  # launch, bf16 and fp8, without and with it, interleaved.
  L=$OUT/logs; mkdir -p $L
  R='{"fused_qkv_rope": true}'
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 170 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py -k "rope" > $L/tests.log 2>&1
  tail -2 $L/tests.log
  JAXLLM_ATTENTION_KNOBS="$R" timeout 100 python3 benchmarks/profile_step.py --context 1024 \
    --steps 6 --top 14 --batch 1 --max-num-seqs 8 --num-scheduler-steps 4 --out-dir /tmp/p1 \
    --out $OUT/results.jsonl > $L/prof_bf16_rope.log 2>&1
  lat_knobs_ab "$R" rope
  for f in $L/lat_*.log; do echo "== $f"; grep "decode ctx" $f; done
  grep -A14 "^batch " $L/prof_bf16_rope.log | cut -c1-150
  show_logs 2 ;;
splitk)  # nvidia-h200 (one GPU), one call, 2026-12-02 (issues 9 and 6): the q/k/v GEMM hands
  # the decode kernel its split-K partials (qkv_split_k 4: XLA splits that GEMM 4 ways at 8
  # rows), so XLA's split-K sum kernel goes: one kernel a layer fewer at batch 1. GPU tests,
  # then latency.py K = 4 without / with it, bf16 and fp8, then the bf16 loop profile with it.
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -p no:cacheprovider \
    -m gpu tests/test_gpu.py -k rope > $L/gpu_tests.log 2>&1; tail -3 $L/gpu_tests.log
  lat_knobs_ab '{"qkv_split_k": 4}' sk4 80
  for f in $L/lat_*.log; do echo "$f $(grep -o 'decode ctx 1024: [0-9.]* ms/token' $f)"; done
  [ $((T - SECONDS)) -gt 90 ] && JAXLLM_ATTENTION_KNOBS='{"qkv_split_k": 4}' timeout $((T - SECONDS - 10)) \
    python3 benchmarks/profile_step.py --context 1024 --steps 6 --batch 1 --max-num-seqs 8 \
    --num-scheduler-steps 4 --top 14 --out-dir /tmp/psk --out $OUT/results.jsonl > $L/prof_sk4.log 2>&1
  show_logs 18 ;;
xlaflags)  # nvidia-h200 (one GPU), one call, 2026-12-02 (issues 9 and 6): the batch-1 loop's
  # small kernels are XLA's fusion choices (a split-K sum + residual add, then a norm; the
  # SwiGLU; the q/k/v split-K sum). Do XLA's fusion / autotuning options fold any of them?
  # latency.py K = 4, bf16 then fp8 for each XLA_FLAGS variant, skipping what the time leaves.
  L=$OUT/logs; mkdir -p $L; i=0
  for f in "" --xla_gpu_enable_split_k_autotuning=false \
      --xla_gpu_experimental_autotune_post_fusion=true \
      --xla_gpu_unsupported_enable_triton_multi_output_fusion=true \
      --xla_gpu_experimental_enable_triton_heroless_priority_fusion=true \
      --xla_gpu_experimental_enable_fusion_autotuner=true \
      --xla_gpu_experimental_all_fusions_with_triton=true; do
    i=$((i + 1))
    for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
      [ $((T - SECONDS)) -lt 80 ] && continue
      echo "$f" > $L/lat_${i}_$q.log
      XLA_FLAGS="$f" timeout 75 $LAT1K $QA --num-scheduler-steps 4 >> $L/lat_${i}_$q.log 2>&1
      echo "$i $q '$f': $(grep -o 'decode ctx 1024: [0-9.]* ms/token' $L/lat_${i}_$q.log)"
    done
  done
  show_logs 2 ;;
pdl)  # nvidia-h200 (one GPU), one call, 2026-12-02 (issues 9 and 6): at batch 1 each of the
  # ~13 kernels a layer costs >= 1.4 us however small (the launch-to-launch floor). Does XLA's
  # programmatic dependent launch (Hopper: the next kernel starts while the previous drains)
  # lower it? The launch-cost chain and the batch-1 loop (K = 4, fused_qkv_rope now the default
  # at 8 tokens), bf16 and fp8, under --xla_gpu_enable_pdl=true / false, interleaved.
  L=$OUT/logs; mkdir -p $L
  for f in "" --xla_gpu_enable_pdl=true --xla_gpu_enable_pdl=false; do
    XLA_FLAGS="$f" timeout 60 python3 benchmarks/gpu/launch_cost.py >> $OUT/results.jsonl 2>> $L/launch.log
  done
  grep us_per_kernel $OUT/results.jsonl | cut -c1-300
  for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    for v in true false; do
      XLA_FLAGS=--xla_gpu_enable_pdl=$v timeout 100 $LAT1K $QA --num-scheduler-steps 4 \
        > $L/lat_${q}_pdl_$v.log 2>&1
    done
  done
  JAXLLM_ATTENTION_KNOBS='{"fused_qkv_rope": false}' timeout 100 $LAT1K --num-scheduler-steps 4 \
    > $L/lat_bf16_norope.log 2>&1
  show_logs 3 ;;
fp8rope)  # nvidia-h200 (one GPU), one call, 2026-12-02 (issue 6): fused_qkv_rope became the
  # default for decode steps of <= 64 tokens on bf16 figures (ropeab: batch 64 -1%); fp8 at
  # 17-64 tokens was not measured. fp8 and fp8 + fp8 KV decode steps of 32 and 64 sequences
  # at the default (rope on) and with it off, interleaved, twice for fp8.
  L=$OUT/logs; mkdir -p $L
  OFF='{"fused_qkv_rope": false}'
  PS="python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 6 --batch 32 64 --quantization fp8 --out $OUT/results.jsonl"
  for r in 1 2; do
    timeout 110 $PS --out-dir /tmp/f$r > $L/prof_fp8_$r.log 2>&1
    JAXLLM_ATTENTION_KNOBS="$OFF" timeout 110 $PS --out-dir /tmp/g$r > $L/prof_fp8_off_$r.log 2>&1
  done
  [ $((T - SECONDS)) -gt 150 ] && timeout 110 $PS --kv-cache-dtype fp8 --out-dir /tmp/h1 > $L/prof_fp8kv.log 2>&1
  [ $((T - SECONDS)) -gt 120 ] && JAXLLM_ATTENTION_KNOBS="$OFF" timeout $((T - SECONDS - 10)) $PS \
    --kv-cache-dtype fp8 --out-dir /tmp/h2 > $L/prof_fp8kv_off.log 2>&1
  for f in $L/prof*.log; do echo "== $f"; grep "^batch " $f | cut -c1-150; done
  show_logs 2 ;;
ropeab)  # nvidia-h200 (one GPU), one call, for the session after 2026-12-02 (issues 9 and 6):
  # fused_qkv_rope (rope and the K/V write inside the decode kernel; -2% at batch 1 in the
  # multi-step loop) as the default? Decode steps of 64 and 256 sequences without / with it,
  # then the offline throughput (1,000 x 512/128, defaults) fp8 + fp8 KV and bf16, without /
  # with it, interleaved. Adopt it if neither batch 64 / 256 nor the throughput lose beyond the
  # noise.
  L=$OUT/logs; mkdir -p $L
  R='{"fused_qkv_rope": true}'
  PS="timeout 150 python3 benchmarks/profile_step.py --context 1024 --steps 10 --top 8 --batch 64 256 --out $OUT/results.jsonl"
  $PS --out-dir /tmp/p1 > $L/prof.log 2>&1
  JAXLLM_ATTENTION_KNOBS="$R" $PS --out-dir /tmp/p2 > $L/prof_rope.log 2>&1
  for f in $L/prof*.log; do echo "== $f"; grep "^batch " $f | cut -c1-150; done
  timeout 130 $TP --quantization fp8 --kv-cache-dtype fp8 > $L/tp_fp8kv.log 2>&1
  JAXLLM_ATTENTION_KNOBS="$R" timeout 130 $TP --quantization fp8 --kv-cache-dtype fp8 \
    > $L/tp_fp8kv_rope.log 2>&1
  left=$((T - SECONDS - 10))
  [ $left -gt 200 ] && timeout 100 $TP > $L/tp_bf16.log 2>&1 && \
    JAXLLM_ATTENTION_KNOBS="$R" timeout $((left - 110)) $TP > $L/tp_bf16_rope.log 2>&1
  tp_rows
  show_logs 2 ;;
prefillprof)  # nvidia-h200 (one GPU), one call (issue 6): where the GPU time of the offline
  # workload's steps goes. Its 33 steps with prompt chunks take 8.3 s of fp8's 13 s (12.8 of
  # bf16's 17.9): profile a 16384-token prefill step (32 prompts x 512) in fp8 and bf16, op
  # group by op group. (The first run also profiled a "1024 x 576" decode step; with its
  # 2048-token step budget the engine never had 1024 sequences in decode at once, so that
  # part is gone.)
  L=$OUT/logs; mkdir -p $L
  PS="python3 benchmarks/profile_step.py --out-dir /tmp/prof --top 25 --out $OUT/prof.jsonl"
  timeout 150 $PS --prefill-tokens 16384 --context 512 --steps 3 --quantization fp8 \
    > $L/prefill_fp8.log 2>&1
  timeout 120 $PS --prefill-tokens 16384 --context 512 --steps 3 > $L/prefill_bf16.log 2>&1
  for f in $L/*.log; do echo "== $f"; grep -A26 "^prefill \|^batch " $f | cut -c1-160; done
  show_logs 3 ;;
kvdot)  # nvidia-h200 (one GPU), one call, for the session after 2026-12-01 afternoon (issue 6):
  # the attention kernel over e4m3 pages took 21-27% less GPU time at batch 256 with the pages
  # upcast to float16 (the kernel's fp8_kv_dot knob), 14% more at 64 x 4k. Does the fp8 + fp8 KV
  # throughput follow? Twice each, interleaved; adopt float16 if it wins beyond the noise.
  # First bf16 once: the same call's baseline, and its split of the time by step kind.
  L=$OUT/logs; mkdir -p $L
  timeout 120 $TP > $L/tp_bf16.log 2>&1
  for i in 1 2; do
    # (float16 is the default since this ran: the bf16 upcast is the knob's "query" now)
    JAXLLM_ATTENTION_KNOBS='{"fp8_kv_dot": "query"}' timeout 120 $TP --quantization fp8 \
      --kv-cache-dtype fp8 > $L/tp_fp8kv_bf16dot_$i.log 2>&1
    JAXLLM_ATTENTION_KNOBS='{"fp8_kv_dot": "float16"}' timeout 120 $TP --quantization fp8 \
      --kv-cache-dtype fp8 \
      > $L/tp_fp8kv_f16dot_$i.log 2>&1
  done
  grep -h "tok/s" $L/*.log | cut -c1-330
  show_logs 4 ;;
normfold)  # nvidia-h200 (one GPU), one call, 2026-12-02 afternoon (issues 9 and 6): the input
  # RMSNorm folded into the q/k/v GEMM (x * g, a prologue XLA fuses: norm_prologue.py) and the
  # decode kernel (r = rsqrt(mean(x^2) + eps)): one kernel a layer fewer. A compiled check of
  # the kernel against pre-scaled q/k/v, then batch-1 latency (4 steps a launch) without / with
  # the knob, bf16 and fp8, interleaved, bf16 once more, and the bf16 loop profile with it.
  L=$OUT/logs; mkdir -p $L
  normfold_check
  lat_knobs_ab '{"fold_input_norm": true}' nf 100
  if [ $((T - SECONDS)) -gt 90 ]; then
    timeout 100 $LAT1K --num-scheduler-steps 4 > $L/lat_bf16_k4_b.log 2>&1
    JAXLLM_ATTENTION_KNOBS='{"fold_input_norm": true}' timeout 100 $LAT1K \
      --num-scheduler-steps 4 > $L/lat_bf16_k4_nf_b.log 2>&1
  fi
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  [ $((T - SECONDS)) -gt 70 ] && JAXLLM_ATTENTION_KNOBS='{"fold_input_norm": true}' \
    timeout $((T - SECONDS - 10)) python3 benchmarks/profile_step.py --context 1024 --steps 6 \
    --top 14 --batch 1 --max-num-seqs 8 --num-scheduler-steps 4 --out-dir /tmp/q1 \
    --out $OUT/results.jsonl > $L/prof_bf16_nf.log 2>&1
  for f in $L/prof*.log; do echo "== $f"; grep -A16 "^batch " $f | cut -c1-150; done
  show_logs 3 ;;
normfold2)  # nvidia-h200 (one GPU), one call, 2026-12-02 evening (issues 9 and 6): the fold with
  # its factor in the scores' scale over bf16 pages (q unscaled, so the first K/V loads need not
  # wait for x's row). The GPU rope tests (the engine's fold variant among them), the compiled
  # check, then batch-1 latency (4 steps a launch) without / with the knob, bf16 and fp8, in
  # rounds that alternate which goes first.
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 200 python3 -m pytest -q -m gpu \
    tests/test_gpu.py -k rope > $L/tests.log 2>&1; tail -3 $L/tests.log
  normfold_check
  lat_rounds '{"fold_input_norm": true}' nf 3 100 75
  show_logs 3 ;;
normfold3)  # nvidia-h200 (one GPU), one call, 2026-12-02 evening (issues 9 and 6): the fold as the
  # default at <= 16 tokens. Batch 1 (4 steps a launch) at the defaults against the fold
  # turned off, bf16 and fp8, in alternating rounds; then the 16-token bucket (16 sequences,
  # profile_step.py, 4 steps a launch) the same two ways.
  L=$OUT/logs; mkdir -p $L
  OFF='{"fold_input_norm": false}'
  lat_rounds "$OFF" off 2 100 0
  for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    for v in d off; do [ $((T - SECONDS)) -gt 80 ] || break
      K=""; [ $v = off ] && K=$OFF
      JAXLLM_ATTENTION_KNOBS="$K" timeout $((T - SECONDS - 20)) python3 benchmarks/profile_step.py \
        --context 1024 --steps 6 --top 4 --batch 16 --max-num-seqs 16 --num-scheduler-steps 4 \
        $QA --out-dir /tmp/q16 --out $OUT/results.jsonl > $L/prof16_${q}_${v}.log 2>&1
    done; done
  for f in $L/prof16*.log; do echo "== $f"; grep -A5 "^batch " $f | cut -c1-150; done
  show_logs 2 ;;
foldcheck)  # nvidia-h200 (one GPU), one call, 2026-12-02 evening (issues 9 and 6): the fold's
  # default (<= 8 tokens) with 8 live sequences in the 8-token bucket (profile_step.py, 4 steps
  # a launch) against it off, bf16 and fp8; then the whole GPU test file at the new default.
  L=$OUT/logs; mkdir -p $L
  OFF='{"fold_input_norm": false}'
  for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    for v in d off off d; do
      K=""; [ $v = off ] && K=$OFF
      JAXLLM_ATTENTION_KNOBS="$K" timeout 100 python3 benchmarks/profile_step.py \
        --context 1024 --steps 6 --top 3 --batch 8 --max-num-seqs 8 --num-scheduler-steps 4 \
        $QA --out-dir /tmp/q8 --out $OUT/results.jsonl >> $L/prof8_${q}_${v}.log 2>&1
    done; done
  for f in $L/prof8*.log; do echo "== $f"; grep "^batch " $f | cut -c1-120; done
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout $((T - SECONDS - 10)) python3 -m pytest \
    -q -m gpu tests/test_gpu.py > $L/tests.log 2>&1; tail -5 $L/tests.log ;;
b1attn)  # nvidia-h200 (one GPU), one call, 2026-12-02 night (issues 9 and 5): the batch-1
  # decode attention call alone (benchmarks/gpu/decode_b1.py: the engine's exact fused call,
  # GPU time, variants of blocks / splits / the combine's form / decode_spread / warps, and
  # the fused preamble's parts left out), then batch 1 in the engine, defaults against the
  # fastest variant it prints (alternating rounds while time is left).
  L=$OUT/logs; mkdir -p $L
  decode_b1 --full
  KN=$(grep '^{"best_knobs"' $L/decode_b1.log | python3 -c \
    "import json, sys; print(json.dumps(json.loads(sys.stdin.read())['best_knobs']))")
  echo "best knobs: $KN"
  [ -n "$KN" ] && [ "$KN" != "{}" ] && lat_rounds "$KN" best 2 60 50 ;;
# (b1attn2 and b1skip, run the same night from the working tree, timed two variants since
# removed: idle decode programs exiting at once, `decode_skip_idle`, and the new K/V built before
# the key loop; RESULTS.md, "Rerun of 2026-12-02 (night)".)
b1single)  # nvidia-h200 (one GPU), one call, 2026-12-02 night (issues 9 and 6): three
  # decode_b1.py rounds with `decode_single` (the one live sequence of a batch-1 step spread
  # statically over every slot's decode programs, one reduce as its combine), then batch 1
  # (4 steps a launch) at the defaults against it at 8 pages x 2 splits, alternating.
  L=$OUT/logs; mkdir -p $L
  decode_b1 --rounds 3
  lat_rounds '{"decode_single": true, "decode_splits": 2}' single 3 60 50 ;;
osplit)  # nvidia-h200 (one GPU), one call, 2026-12-02 late (issues 9 and 6; knobs in 4b83398
  # only, removed after: no gain, RESULTS): the o projection written as 8 split-K partials
  # summed elementwise (`o_split_k`), so XLA can fuse the sum and the residual add into the
  # MLP's norm and the layer's last add (one kernel a layer fewer?).
  L=$OUT/logs; mkdir -p $L
  prof_knobs_ab '{"o_split_k": 8}' os ;;
# osplit2 (2026-12-02 late, one call, from a working tree since changed): the same profile with
# the two consumers' sums kept apart by an optimization barrier, and the optimized HLO: 350 ops
# still, the MLP's norm is a Triton normalization fusion that takes no producer (RESULTS).
mlpfold)  # nvidia-h200 (one GPU), one call, 2026-12-02 late (issues 9 and 6; knobs in 4b83398
  # only, removed after: no gain, RESULTS): `fold_mlp_norm` with `o_split_k` 8: the o
  # projection's partials summed in the layer, the MLP's RMSNorm folded (gate/up takes x * g,
  # the SwiGLU applies r), so the residual add, x * g and r can be one kernel.
  L=$OUT/logs; mkdir -p $L
  prof_knobs_ab '{"o_split_k": 8, "fold_mlp_norm": true}' mf ;;
b1single2)  # nvidia-h200 (one GPU), one call, 2026-12-02 night: b1single's combine as one loop
  # fusion (`decode_combine` "unrolled"), then batch 1 at the defaults against it, alternating.
  L=$OUT/logs; mkdir -p $L
  decode_b1 --rounds 3
  lat_rounds '{"decode_single": true, "decode_splits": 2, "decode_combine": "unrolled"}' su 2 60 50 ;;
spread)  # nvidia-h200 (one GPU), one call, 2026-12-02 evening (issues 9 and 6): at batch 1 the
  # decode kernel of an 8-slot step keeps 20 of its 160 programs busy; `decode_spread` gives the
  # padding slots' programs splits of the live sequence (one combine merges them). A compiled
  # check against the unspread kernel at the 8B heads (1, 3 and 8 live slots; rope, 4 split-K
  # partials, the folded norm), then batch 1 (4 steps a launch) without / with it, alternating.
  L=$OUT/logs; mkdir -p $L
  timeout 120 python3 - > $L/check.log 2>&1 <<'PY'
import functools, jax, jax.numpy as jnp, numpy as np
from tests.test_pallas_kernels import _random_batch
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
rng = np.random.default_rng(4)
T, S, M, B, H, K, D, E, parts = 8, 8, 64, 16, 32, 8, 128, 4096, 4
for n in (1, 3, 8):
    args, _ = _random_batch(rng, kinds=("decode",) * n, T=T, S=S, M=M, B=B, P=S * M + 2, H=H,
                            K=K, D=D, dtype=jnp.bfloat16)
    _, kp, vp, sl, pt, qsl, ns = args
    partials = jnp.asarray(rng.standard_normal((parts * T, K, 6 * D)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((T, E)), jnp.bfloat16)
    pos = np.maximum(np.asarray(sl) - 1, 0)
    slots = jnp.asarray(np.asarray(pt)[np.arange(S), pos // B] * B + pos % B, jnp.int32)
    ang = jnp.asarray(pos, jnp.float32)[:, None] * jnp.linspace(0.01, 1, D // 2)[None, :]
    def run(**kw):
        return jax.jit(functools.partial(
            ragged_paged_attention, sm_scale=D ** -0.5, decode_only=True,
            qkv_rope=(ang, 1.0, 1.0), qkv_parts=parts, qkv_dtype=jnp.bfloat16,
            qkv_norm=(x, 1e-5), **kw))(partials, kp, vp, sl, pt, qsl, ns,
                                        new_kv=(None, None, slots))
    a, b = run(decode_spread=True), run()
    err = float(jnp.linalg.norm((a[0] - b[0]).astype(jnp.float32)[:n]) /
                jnp.linalg.norm(b[0].astype(jnp.float32)[:n]))
    print(f"spread check n={n}: out rel err {err:.2e}, padding rows zero "
          f"{bool(jnp.all(a[0][n:] == 0))}, pages identical "
          f"{[bool(jnp.all(u == w)) for u, w in zip(a[1:], b[1:])]}")
PY
  cat $L/check.log | tail -4
  lat_rounds '{"decode_spread": true}' sp 2 60 50 ;;
fusedmlp)  # nvidia-h200 (one GPU), one call (issues 9 and 6): the batch-1 MLP is five kernels a
  # layer under XLA; the one-kernel MLP (norm, gate/up, SwiGLU, down) in layer chains against it.
  L=$OUT/logs; mkdir -p $L
  timeout ${T:-540} python3 benchmarks/gpu/fused_mlp.py --out $OUT/fused_mlp.jsonl --budget 420 \
    > $L/fused_mlp.log 2>&1; echo "rc=$?"
  grep -v "^{" $L/fused_mlp.log | tail -40 | cut -c1-300; grep '"check"\|error' $L/fused_mlp.log | cut -c1-300 | head -20 ;;
mlpk)  # nvidia-h200 (one GPU), one call (issues 9 and 6): after fusedmlp, the MLP's RMSNorm,
  # gate/up GEMM and SwiGLU as one kernel in the engine (`mlp_kernel` knob): the GPU tests, batch 1
  # in alternating rounds against the defaults, then a profile of each with the knob.
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -m gpu \
    tests/test_gpu.py -k "fused_mlp or mlp_kernel" > $L/gputests.log 2>&1; tail -3 $L/gputests.log
  lat_rounds '{"mlp_kernel": true}' mk 2 60 50
  for q in bf16 fp8; do QA=""; [ $q = fp8 ] && QA="--quantization fp8"
    [ $((T - SECONDS)) -gt 70 ] || break
    JAXLLM_ATTENTION_KNOBS='{"mlp_kernel": true}' timeout 65 python3 benchmarks/profile_step.py \
      --context 1024 --steps 6 --top 14 --batch 1 --max-num-seqs 8 --num-scheduler-steps 4 \
      $QA --out-dir /tmp/po --out $OUT/results.jsonl > $L/prof_${q}_mk.log 2>&1
    grep -A16 "^batch " $L/prof_${q}_mk.log | cut -c1-110; done
  show_logs 6 ;;
mlpdef)  # nvidia-h200 (one GPU), one call (issue 9): after mlpk, the MLP kernel is the default
  # for dense weights at <= 8 rows on a GPU: every GPU test, then bf16 batch 1 at the default
  # against {"mlp_kernel": false}, alternating rounds.
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 330 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py > $L/gpu_tests.log 2>&1
  grep -v "^\s*$" $L/gpu_tests.log | tail -6
  for i in 1 2; do for v in $([ $i = 1 ] && echo "d off" || echo "off d"); do
      [ $((T - SECONDS)) -gt 45 ] || break
      K=""; [ $v = off ] && K='{"mlp_kernel": false}'
      JAXLLM_ATTENTION_KNOBS="$K" timeout 60 $LAT1K --num-scheduler-steps 4 \
        > $L/lat_bf16_${v}_r$i.log 2>&1; done; done
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  show_logs 4 ;;
mlptile)  # nvidia-h200 (one GPU), one short call (issue 9): gate_up_swiglu's bf16 best took 4
  # stages, the most the 2026-12-03 sweep tried; more stages and thinner K tiles, in layer
  # chains, then bf16 batch 1 with the fastest (JAXLLM_GATE_UP_SWIGLU_BLOCKS) against the table.
  L=$OUT/logs; mkdir -p $L
  C='[{"block_f":128,"block_k":64,"num_warps":4,"num_stages":4},
      {"block_f":128,"block_k":64,"num_warps":4,"num_stages":5},
      {"block_f":128,"block_k":64,"num_warps":4,"num_stages":6},
      {"block_f":128,"block_k":32,"num_warps":4,"num_stages":6},
      {"block_f":128,"block_k":32,"num_warps":4,"num_stages":8},
      {"block_f":128,"block_k":64,"num_warps":8,"num_stages":5}]'
  timeout 120 python3 benchmarks/gpu/fused_mlp.py --dtypes bf16 --cands "$C" \
    --out $OUT/fused_mlp.jsonl > $L/tile.log 2>&1
  B=$(python3 - $OUT/fused_mlp.jsonl <<'PY'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
rs = [r for r in rs if "us" in r]
b, base = min(rs, key=lambda r: r["us"]), rs[0]
print(",".join(str(b["sweep"][k]) for k in ("block_f", "block_k", "num_warps", "num_stages"))
      if b["us"] < base["us"] - 0.3 else "")
PY
)
  grep '"sweep"' $L/tile.log | cut -c1-160; echo "best: '$B'"
  if [ -n "$B" ]; then for i in 1 2; do for v in $([ $i = 1 ] && echo "d t" || echo "t d"); do
      [ $((T - SECONDS)) -gt 45 ] || break
      K=""; [ $v = t ] && K=$B
      JAXLLM_GATE_UP_SWIGLU_BLOCKS="$K" timeout 60 $LAT1K --num-scheduler-steps 4 \
        > $L/lat_bf16_${v}_r$i.log 2>&1; done; done
    for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done; fi
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
resgemm)  # nvidia-h200 (one GPU), one call (issue 9): the o and down projections with the
  # residual add in the skinny GEMM's epilogue (pallas_kernels/skinny_matmul.py; the engine does
  # not call it): the GPU tests, then benchmarks/gpu/residual_gemm.py (block sweep at 8 rows in
  # layer chains, then XLA's GEMM + add against the best config at 1 and 8 rows).
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -m gpu \
    tests/test_gpu.py -k "residual" > $L/gputests.log 2>&1; tail -3 $L/gputests.log
  timeout $((T - SECONDS - 15)) python3 benchmarks/gpu/residual_gemm.py \
    --budget $((T - SECONDS - 120)) --out $OUT/residual_gemm.jsonl > $L/residual_gemm.log 2>&1
  echo "rc=$?"; grep -v '^{' $L/residual_gemm.log | tail -12; grep -c '"sweep"' $L/residual_gemm.log
  grep '"sweep"' $L/residual_gemm.log | sort -t: -k5 -n | head -8 | cut -c1-200 ;;
qkvsk)  # nvidia-h200 (one GPU), one call (issue 9): the q/k/v GEMM is the batch-1 loop's slowest
  # reader (14.6 us a layer, 50.3 MB: 3.4 TB/s, where the down GEMM reads 4.1): bf16 batch 1 (4
  # steps a launch) with its split-K parts summed by the decode kernel at the default 4 against
  # 2 and 8 ({"qkv_split_k": N}), two rounds in rotating order, then the default with 8 steps a
  # launch.
  L=$OUT/logs; mkdir -p $L
  V="d s2 s8"; for i in 1 2; do for v in $V; do [ $((T - SECONDS)) -gt 60 ] || break
      K=""; [ $v != d ] && K="{\"qkv_split_k\": ${v#s}}"
      JAXLLM_ATTENTION_KNOBS="$K" timeout 60 $LAT1K --num-scheduler-steps 4 \
        > $L/lat_bf16_${v}_r$i.log 2>&1; done; V="s8 d s2"; done
  [ $((T - SECONDS)) -gt 60 ] && timeout 60 $LAT1K --num-scheduler-steps 8 > $L/lat_bf16_k8.log 2>&1
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done ;;
k8)  # nvidia-h200 (one GPU), one call (issues 9 and 6): batch 1 with 8 steps a launch against 4,
  # bf16 four rounds and fp8 two, alternating (qkvsk's one K = 8 run read 4.14 ms/token).
  L=$OUT/logs; mkdir -p $L
  for i in 1 2 3 4; do for q in bf16 fp8; do [ $q = fp8 ] && [ $i -gt 2 ] && continue
      QA=""; [ $q = fp8 ] && QA="--quantization fp8"
      for k in $([ $((i % 2)) = 1 ] && echo "4 8" || echo "8 4"); do
        [ $((T - SECONDS)) -gt 45 ] || break
        timeout 45 $LAT1K $QA --num-scheduler-steps $k > $L/lat_${q}_k${k}_r$i.log 2>&1
      done; done; done
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done ;;
verdict)  # nvidia-h200 (one GPU), one call (issues 9 and 6): the batch-1 figures against the
  # roofline measured in the same run (latency.py's GPU-time probes, roofline_fraction: issue
  # 9 asks >= 0.9 in bf16, issue 6 fp8 within 15%), three bf16 and two fp8 runs, then the
  # batch-256 step's host wait (issue 9: the GPU idle < 5% of a decode step), twice.
  L=$OUT/logs; mkdir -p $L
  for i in 1 2 3; do for q in bf16 fp8; do [ $q = fp8 ] && [ $i = 3 ] && continue
      [ $((T - SECONDS)) -gt 260 ] || break
      QA=""; [ $q = fp8 ] && QA="--quantization fp8"
      timeout 80 $LAT1K $QA --num-scheduler-steps 4 > $L/lat_${q}_r$i.log 2>&1
      grep -h "ms/token" $L/lat_${q}_r$i.log; done; done
  python3 - $OUT/results.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "decode":
        print(r["engine"], round(r["ms_per_token"], 3), "fraction",
              round(r.get("roofline_fraction", 0), 3), {k: round(v) for k, v in
                                                      r["bandwidth_probes_gbs"].items()})
PY
  idle256 2 ;;
mosaic)  # nvidia-h200 (one GPU), one call (issues 9 and 6): Mosaic GPU GEMMs (JAX's shipped
  # Hopper matmul, our split-K and swapped forms, fp8 W8A8) at 8 rows against XLA's dots, GPU
  # time, the four projection shapes (mosaic_gemv.py; ~90 s; 2026-12-03: none beat XLA).
  timeout $((T - 20)) python3 benchmarks/gpu/mosaic_gemv.py --out $OUT/mosaic.jsonl 2>&1 \
    | grep -v '^{' | tail -100; cut -c1-300 $OUT/mosaic.jsonl | grep error ;;
mchain)  # nvidia-h200 (one GPU), one call (issues 9 and 6): the Mosaic GPU persistent chain
  # (mosaic_chain.py: 32 o-shaped layers in one launch, TMA weight stream running ahead of a
  # GMEM-semaphore grid barrier) against XLA's chain of dots. Each barrier form in a process of
  # its own under a timeout: a wrong barrier hangs, and must not take the table with it.
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -12
  for c in 4x128x4 4x64x8; do
    timeout 80 python3 benchmarks/gpu/mosaic_chain.py --variants sync,sync_sys --cands $c \
      --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -6
  done ;;
mchain2)  # nvidia-h200 (one GPU), one call: the chain's barrier per K slice against the grid
  # barrier and XLA in the same call (13:09 run of `mchain`: grid barrier 10.45 µs a layer, XLA
  # 11.95, no barrier 8.16).
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --variants xla,sync,sync_slice \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  # the run-ahead's depth: 4 stages of 32 KB (above), 8 of 16, 2 of 32 (half), 2 of 64
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --variants sync_slice,sync \
    --cands 4x64x8,4x128x2,4x256x2 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -10 ;;
mchain3)  # nvidia-h200 (one GPU), one call: the chain's barrier latency link by link (the
  # ablations drop the split partials' TMA-add, the activations' reload, or both: timing only),
  # at the o shape and at 1024 x 1024 layers (2 MB: the latency chain alone, ~0.5 µs of
  # weights), XLA's chain beside each. DESIGN_NOTES: a layer kernel needs ~1.3 µs a boundary.
  V=xla,nosync,sync,sync_noadd,sync_nox,sync_noadd_nox
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants $V --cands 4x128x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -10
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --dim 1024 --variants $V --cands 4x64x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -10 ;;
mchain4)  # nvidia-h200 (one GPU), one call: the chain with the zeroing's poll at layer 0 only
  # (mprof of 15:37: the epilogue's poll of the hot semaphore took ~2.3 µs a layer), against
  # the old form, XLA and no barrier in the same process; the other tiles; 1024 x 1024 layers.
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync,sync_zerowait \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants sync,sync_slice,sync_sys \
    --cands 4x128x4,4x64x8,4x128x2,2x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -16
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --dim 1024 --variants xla,nosync,sync \
    --cands 4x64x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -6 ;;
mchain5)  # nvidia-h200 (one GPU), one call: the signal as a relaxed atomic add (mchain4's
  # profile: the epilogue's 2.5 µs a layer is not the zero poll; the release add is a fence
  # that waits for the CTA's loads in flight, the weight stream's too), XLA and no barrier in
  # the same process; its tiles; 1024 x 1024 layers.
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,sync_relaxed,sync_slice_relaxed \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -9
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants sync_relaxed,sync_slice_relaxed \
    --cands 4x64x8,4x128x2,2x128x4,4x256x2 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -12
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --dim 1024 \
    --variants xla,nosync,sync,sync_relaxed --cands 4x64x4 --out $OUT/chain.jsonl 2>&1 \
    | grep -v '^{' | tail -7 ;;
mchain6)  # nvidia-h200 (one GPU), one call: which part of the release costs (a relaxed add after
  # a proxy fence / after an acq_rel fence), then every signal form called 60 times against
  # the reference (a stale read shows as an outlier; mchain5 saw one 3.9e-2 among 2.0e-2s).
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,sync_relaxed,sync_proxy,sync_acqrel,sync_slice_relaxed \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -10
  timeout 200 python3 benchmarks/gpu/mosaic_chain.py --stress 60 \
    --variants sync,sync_relaxed,sync_proxy,sync_slice_relaxed,sync_slice \
    --cands 4x128x4,4x64x8 --out $OUT/stress.jsonl 2>&1 | tail -12 ;;
mchain7)  # nvidia-h200 (one GPU), one call: the signal after PTX's release-only fence
  # (fence.release.gpu, then a relaxed add) against Pallas' release add, timed and stressed
  # (mchain6: a relaxed add without a release reads stale data in 7-10 calls of 60).
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,sync_relfence,sync_slice --cands 4x128x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --stress 100 \
    --variants sync_relfence,sync --cands 4x128x4,4x64x8 --out $OUT/stress.jsonl 2>&1 \
    | tail -4 ;;
mchain8)  # nvidia-h200 (one GPU), one call: the flat pipeline (one pipeline over all layers'
  # steps, so the run-ahead can take 5 x 32 KB or 11 x 16 KB of SMEM, not 4 x 32 KB): does
  # a deeper run-ahead hide the barrier (mchain7's profile: the compute side is blocked ~3.7
  # µs a layer, about what 4 stages cover)? Then the deepest correct forms stressed.
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -6
  timeout 200 python3 benchmarks/gpu/mosaic_chain.py \
    --variants nosync_flat,sync_flat,sync_slice_flat \
    --cands 4x128x4,4x128x5,4x64x8,4x64x11 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -15
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --stress 60 \
    --variants sync_flat,sync_slice_flat --cands 4x128x5,4x64x11 --out $OUT/stress.jsonl \
    2>&1 | tail -4
  PV=sync_flat CAND=4x64x11 bash benchmarks/gpu/issues.sh mprof 2>&1 | grep -v arn | tail -2 ;;
mchain9)  # nvidia-h200 (one GPU), one call: is the release's cost its stall or its place on the
  # path? The acq_rel fence after a relaxed add (no ordering: timing only) against the
  # release and the relaxed add, chained and flat (11 x 16 KB of run-ahead).
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,sync_relaxed,sync_postfence --cands 4x128x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py \
    --variants nosync_flat,sync_flat,sync_relaxed_flat,sync_postfence_flat --cands 4x64x11 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -7 ;;
mgather)  # nvidia-h200 (one GPU), one call: the chain with no signal between layers (K split
  # partials stored into a NaN-filled buffer, polled and summed by their readers; mosaic_gather.py)
  # stressed against the release form first, then timed beside sync / nosync / XLA, then its
  # regions under the profiler.
  timeout 100 python3 benchmarks/gpu/mosaic_chain.py --stress 3 --variants gather_nopoll,gather \
    --cands 4x128x4 --out $OUT/first.jsonl 2>&1 | grep -v '^{' | tail -4
  cat $OUT/first.jsonl; grep -q '"variant": "gather",' $OUT/first.jsonl || exit 1
  timeout 170 python3 benchmarks/gpu/mosaic_chain.py --stress ${N:-40} --variants sync,gather \
    --cands 4x128x4,4x64x8 --out $OUT/stress.jsonl 2>&1 | grep -v '^{' | tail -4
  cat $OUT/stress.jsonl
  timeout 200 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,gather,gather_nopoll --cands 4x128x4,4x64x8 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -14
  PV="gather" CAND=4x128x4 PL=16 bash $0 mprof ;;
mdyn)  # nvidia-h200 (one GPU), one call: the chain with dynamic work distribution (a layer's
  # units from a counter; mosaic_dynamic.py): a first check, stressed against the release form,
  # then timed beside sync / nosync / XLA (grid 128 / 132, units of 1024 / 512 of K). The
  # first check: the configurations that hung on 2026-12-03 (RESULTS "(20:10)": units of 1024 at 4
  # and 32 layers, of 512 at 32 layers), 5 calls each in a process of its own under a timeout.
  timeout 100 python3 benchmarks/gpu/mosaic_dynamic.py --debug --timeout 30 --configs \
    "4096,4,128,4,1024,128,0,5;4096,32,128,4,1024,128,0,5;4096,32,128,4,512,128,0,5" \
    | tee $OUT/debug.txt
  grep -q '^4096,32,128,4,1024,128,0,5 rc 0 ' $OUT/debug.txt || exit 1
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --stress ${N:-30} \
    --variants sync,dyn,dyn_g132,dyn_u512 --cands 4x128x4 --out $OUT/stress.jsonl 2>&1 \
    | grep -v '^{' | tail -4
  cat $OUT/stress.jsonl
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py \
    --variants xla,nosync,sync,dyn_static,dyn,dyn_g132,dyn_u512,dyn_u512_g132 --cands 4x128x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -10 ;;
ml2)  # nvidia-h200 (one GPU), one call: the release form with the next layer's weights
  # prefetched into the L2 (mosaic_chain.py sync_pfN: 4 more CTAs paced by the grid barrier;
  # sync_selfpfN: by the compute warpgroups), stressed, then timed beside sync / nosync / XLA.
  timeout 200 python3 benchmarks/gpu/mosaic_chain.py --stress ${N:-20} \
    --variants sync,sync_pf4,sync_pf8,sync_selfpf8 --cands 4x128x4 --out $OUT/stress.jsonl \
    2>&1 | grep -v '^{' | tail -4
  cat $OUT/stress.jsonl
  timeout 200 python3 benchmarks/gpu/mosaic_chain.py --variants \
    xla,nosync,sync,sync_pf2,sync_pf4,sync_pf6,sync_pf8,sync_selfpf4,sync_selfpf8 \
    --cands 4x128x4,4x64x8 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -22 ;;
mbar)  # nvidia-h200 (one GPU), one call: the chain's grid barrier alone, no weights
  # (grid_barrier.py: the signal, with the epilogue's store / add, with the activations'
  # reload), over 128 / 132 / 64 / 32 CTAs, beside the chain (sync / nosync) for scale.
  timeout 240 python3 benchmarks/gpu/grid_barrier.py --out $OUT/barrier.jsonl 2>&1 \
    | grep -v '^{' | tail -20
  # beside an independent weight stream of 1 / 2 / 8 tiles a round (8: the o layer's bytes)
  timeout 240 python3 benchmarks/gpu/grid_barrier.py --grids 128 --streams 0,1,2,8 \
    --forms none,signal,add_load --out $OUT/stream.jsonl 2>&1 | grep -v '^{' | tail -14
  timeout 120 python3 benchmarks/gpu/mosaic_chain.py --variants nosync,sync --cands 4x128x4 \
    --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -5 ;;
mpdl)  # nvidia-h200 (one GPU), one call: a Mosaic GPU kernel a layer launched with PDL (the
  # weight stream starts before the wait for the previous layer; _narrow: two CTAs fit an SM),
  # stressed, then timed beside the same kernels without PDL, XLA's chain and the persistent
  # sync form; then the main forms again with XLA's command buffers off.
  timeout 150 python3 benchmarks/gpu/mosaic_pdl.py --stress ${N:-20} \
    --variants pdl_early,pdl_late,pdl_early_narrow --cands 4x128x4 --narrow-cands 2x64x4 \
    --out $OUT/stress.jsonl 2>&1 | grep -v '^{' | tail -4
  cat $OUT/stress.jsonl
  timeout 280 python3 benchmarks/gpu/mosaic_pdl.py --variants \
    xla,persistent,plain,pdl_early,pdl_late,plain_xla,pdl_early_xla,plain_narrow,pdl_early_narrow \
    --cands 4x128x4 --narrow-cands 2x64x4 --out $OUT/pdl.jsonl 2>&1 | grep -v '^{' | tail -14
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 benchmarks/gpu/mosaic_pdl.py \
    --variants xla,plain,pdl_early,pdl_late --cands 4x128x4 --out $OUT/pdl_nocb.jsonl 2>&1 \
    | grep -v '^{' | tail -7 ;;
mgather2)  # nvidia-h200 (one GPU), one call: where the gather form's wait goes (its polls
  # counted under the profiler, 12 layers, beside the release form), and a second timing at the
  # o shape and at 1024 x 1024.
  PV="gather sync" CAND=4x128x4 PL=12 bash $0 mprof
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync,gather,gather_nopoll \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync,gather --dim 1024 \
    --cands 4x64x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -7 ;;
mprof)  # nvidia-h200 (one GPU), one call: the chain's regions under Mosaic GPU's on-device
  # profiler (where each warpgroup's layer goes: the barrier wait, the activations' load, the
  # weight tiles' waits, the epilogue; and the grid's signal-to-release latency), each variant
  # in a process of its own; the last trace of each kept (gzip).
  for v in ${PV:-sync nosync sync_nox sync_noadd}; do
    timeout 120 python3 benchmarks/gpu/mosaic_chain.py --profile $OUT/prof --variants $v \
      --cands ${CAND:-4x128x4} --layers ${PL:-32} --out $OUT/prof.jsonl 2>&1 | grep -v '^{' | tail -4
    f=$(ls -t $OUT/prof/$v-*/*.json 2>/dev/null | head -1)
    [ -n "$f" ] && gzip -c "$f" > $OUT/prof-$v.json.gz
    rm -rf $OUT/prof/$v-*
  done
  cat $OUT/prof.jsonl ;;
idle)  # nvidia-h200 (one GPU), one call (issue 9): the GPU's idle share of a decode step at
  # batch 256, three times (profile_step.py: the host wait, and the step replayed back to back
  # against the engine's step), then batch 1 as latency.py runs it (8 sequences, 4 steps a
  # launch).
  L=$OUT/logs; mkdir -p $L
  idle256 3
  timeout 150 python3 benchmarks/profile_step.py --context 1024 --steps 20 --top 6 --batch 1 \
    --max-num-seqs 8 --num-scheduler-steps 4 --out-dir /tmp/p1 --out $OUT/results.jsonl \
    > $L/prof1.log 2>&1; echo "rc=$?"; grep -A3 "^batch " $L/prof1.log | cut -c1-260 ;;
mlpwo)  # nvidia-h200 (one GPU), one call (issue 6): gate_up_swiglu's weight-only fp8 modes (the
  # e4m3 tile upcast to bf16 / float16 in registers, no activation quantization; the engine does
  # not call it) in fp8 layer chains against XLA's weight-only MLP and the W8A8 kernel: the GPU
  # tests, then four tiles per mode, then one round of the chains' table (XLA, W8A8 and each
  # mode at its best tile, in the same run).
  L=$OUT/logs; mkdir -p $L
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -m gpu \
    tests/test_gpu.py -k "fused_mlp" > $L/gputests.log 2>&1; tail -3 $L/gputests.log
  C='[{"block_f":128,"block_k":128,"num_warps":8,"num_stages":4},
      {"block_f":128,"block_k":64,"num_warps":4,"num_stages":4},
      {"block_f":64,"block_k":128,"num_warps":4,"num_stages":4},
      {"block_f":128,"block_k":256,"num_warps":8,"num_stages":3}]'
  timeout $((T - SECONDS - 10)) python3 benchmarks/gpu/fused_mlp.py --dtypes fp8 --rounds 1 \
    --weight-only bfloat16,float16 --cands "$C" --out $OUT/fused_mlp.jsonl > $L/wo.log 2>&1
  echo "rc=$?"; grep '"check"\|"sweep"' $L/wo.log | cut -c1-200; grep -v '^{' $L/wo.log | tail -10 ;;
gemmopt)  # nvidia-h200 (one GPU), one call (issues 9 and 6): at batch 1 the q/k/v and o GEMMs
  # read at 3.2 TB/s under XLA's Triton split-K configs, and the fp8 GEMM fusions' autotuning
  # at 16384 tokens took 306 s. The GEMMs alone under per-program XLA options (one process),
  # then the batch-1 step with XLA's defaults and with every GEMM on cuBLAS (XLA_FLAGS).
  L=$OUT/logs; mkdir -p $L
  LAT="timeout 120 python3 benchmarks/latency.py --engine jaxllm --contexts 1024 --prefill 512 --repeats 3 --out $OUT/results.jsonl"
  timeout 240 python3 benchmarks/kernels.py --sections gemm_options --budget 200 --device-time \
    --out $OUT/results.jsonl > $L/gemm_options.log 2>&1
  $LAT > $L/lat_default.log 2>&1
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $LAT > $L/lat_cublas.log 2>&1
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $LAT --quantization fp8 > $L/lat_fp8_cublas.log 2>&1
  python3 - $OUT/results.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("section") == "gemm":
        print(f"{r['impl']:18s} M={r['M']:5d} K={r['K']:5d} N={r['N']:6d} {r['config']['options']:10s}"
              f" dev={r.get('device_us', float('nan')):8.1f}us wall={r.get('time_us', float('nan')):8.1f}us"
              f" ops={r.get('ops_per_call', '-')} {r.get('error', '')[:80]}")
PY
  show_logs 8 ;;
serve8b)  # nvidia-h200 (one GPU), one call (issue 9: time to first served request < 2 min for
  # the 8B shape, load from disk + compile of every bucket). Carry .whl (pydantic) and .bench.
  # A random Llama-3-8B checkpoint written to local disk, then `jaxllm serve` on it at its
  # defaults: cold (empty compilation cache, the page cache dropped if the container allows),
  # then restarts in new processes over the filled cache (RESTARTS="on off on": the executable
  # cache on / off, default "on"); then fp8 (quantized at load) the same
  # way while the call has time (Q="bf16" for bf16 only).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  L=$OUT/logs; mkdir -p $L; C=/tmp/ckpt8b; df -h /tmp | tail -1
  [ -f $C/config.json ] || python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer \
    || exit 1
  for q in ${Q:-bf16 fp8}; do
    [ $q = fp8 ] && X="--quantization fp8" || X=""
    [ $((T - SECONDS)) -gt 100 ] || { echo "no time left for $q"; break; }
    NOTE="$(drop)"; echo "$q cold: $NOTE"
    timeout $((T - SECONDS - 10)) python3 benchmarks/startup.py --out $OUT/startup.jsonl serve $C \
      --runs 1 --cache-dir /tmp/xla-$q --log-dir $L/$q-cold --note "cold; $NOTE" -- $X
    # Restarts with the executable cache on / off (RESTARTS="on off on": interleaved A/B).
    for e in ${RESTARTS:-on}; do
      [ $((T - SECONDS)) -gt 60 ] || { echo "no time left for the $q restart"; break; }
      [ $e = off ] && E="JAXLLM_EXECUTABLE_CACHE_DIR=" || E="AB_ON=1"
      env $E timeout $((T - SECONDS - 10)) python3 benchmarks/startup.py --out $OUT/startup.jsonl \
        serve $C --runs 1 --cache-dir /tmp/xla-$q --keep-cache --log-dir $L/$q-warm-$e$SECONDS \
        --note "restart, page cache warm, executable cache $e" -- $X
    done
    # The KV page count is a shape of the step programs: a restart that sizes another count
    # cannot take them from the compilation cache (RESULTS, 2026-12-04 13:50).
    tail -$((1 + $(echo ${RESTARTS:-on} | wc -w))) $OUT/startup.jsonl | python3 -c "import json, sys
p = [json.loads(line).get('pages') for line in sys.stdin]
print('$q KV pages cold / restarts:', p, 'equal' if len(set(p)) == 1 else 'DIFFER')"
  done
  grep -H "loaded\|sized\|compiled\|ready\|KV cache\|executable" $L/*/serve_0.log | cut -c1-240
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
loadprobe)  # nvidia-h200 (one GPU), one call (issue 9's start-up): where the load of the 8B
  # checkpoint goes (load_probe.py): the raw rates, then the loader with safetensors' reader
  # (before) and the memory-mapped one, page cache warm, in two alternating rounds, then cold
  # (page cache dropped). (The rows of 2026-12-04 with 0 / 4 / 8 copy threads ran 52cbb08.)
  # Carry .bench.
  C=/tmp/ckpt8b; python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer || exit 1
  P="timeout 120 python3 benchmarks/gpu/load_probe.py $C --out $OUT/load.jsonl"
  $P --raw
  for r in 1 2; do for v in safetensors mmap; do
    [ $((T - SECONDS)) -gt 150 ] || { echo "no time left for round $r"; break 2; }
    [ $r = 1 ] && [ $v = mmap ] && X=--twice || X=""
    $P --reader $v --note "page cache warm, round $r" $X; done; done
  for v in mmap safetensors; do
    [ $((T - SECONDS)) -gt 100 ] || { echo "no time left for cold $v"; break; }
    NOTE="$(drop)"; $P --reader $v --note "cold: $NOTE"; done ;;
serveab)  # nvidia-h200 (one GPU), one call: time to first served request (bf16, the 8B
  # checkpoint) of this tree against another checkout in $OLD (git archive REV | tar -x -C DIR,
  # untracked so that it travels), in one call: each cold, then restarts alternating. Carry
  # .whl and .bench.
  [ -d "$OLD" ] || { echo "OLD=$OLD is not a checkout"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  L=$OUT/logs; mkdir -p $L; C=/tmp/ckpt8b
  python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer || exit 1
  ab() { local tree=$1 tag=$2 run=$3; shift 3
    [ $((T - SECONDS)) -gt 80 ] || { echo "no time left for $tag $run"; return 1; }
    timeout $((T - SECONDS - 10)) python3 $tree/benchmarks/startup.py --out $OUT/startup.jsonl \
      serve $C --runs 1 --cache-dir /tmp/xla-$tag --log-dir $L/$tag-$run --note "$tag $run" "$@"
  }
  for tag in old new; do [ $tag = old ] && tree=$OLD || tree=$PWD; drop
    ab $tree $tag cold || break; done
  for r in 1 2; do for tag in new old; do [ $tag = old ] && tree=$OLD || tree=$PWD
    ab $tree $tag restart$r --keep-cache || break 2; done; done
  grep -h "loaded\|placed\|sized\|lowered\|compiled\|ready\|KV cache\|device memory" \
    $L/*/serve_0.log \
    | cut -c1-220
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
prefetchab)  # nvidia-h200 (one GPU), one call: the loader's copies ahead of the config's read
  # (JAXLLM_LOAD_PREFETCH), bf16 8B checkpoint, jaxllm serve at its defaults. Cold (page cache
  # dropped, compilation cache emptied): auto (which finds the files uncached and copies after
  # the config) and forced on; then restarts over the filled caches alternating 0 and auto
  # (cached: copies ahead). Carry .whl and .bench.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  L=$OUT/logs; mkdir -p $L; C=/tmp/ckpt8b
  python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer || exit 1
  pf() { local mode=$1 run=$2; shift 2
    [ $((T - SECONDS)) -gt 70 ] || { echo "no time left for $mode $run"; return 1; }
    JAXLLM_LOAD_PREFETCH=$mode timeout $((T - SECONDS - 10)) python3 benchmarks/startup.py \
      --out $OUT/startup.jsonl serve $C --runs 1 --cache-dir /tmp/xla-pf --log-dir $L/$mode-$run \
      --note "prefetch=$mode $run" "$@"
  }
  for mode in auto 1; do drop; pf $mode cold || break; done
  for r in 1 2 3; do for mode in 0 auto; do pf $mode warm$r --keep-cache || break 2; done; done
  grep -h "placed\|device memory\|KV cache\|ready" $L/*/serve_0.log | cut -c1-200
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
layerjit)  # nvidia-h200 (one GPU), one call (issue 9's cold start): the layers called through
  # one nested jit (JAXLLM_LAYER_JIT=1) against the plain loop (0). First the compiled programs'
  # ops (layer_jit_hlo.py, 4 layers of the 8B shape: the lines must match), then latency.py at
  # 1k context and a 2k prefill, alternating 0 1 0 1, without the executable cache (each run
  # lowers every program: the start-up line says in how long) but with the compilation cache
  # (the second of each pair compiles from it).
  L=$OUT/logs; mkdir -p $L
  for v in 0 1; do
    JAXLLM_LAYER_JIT=$v timeout 150 python3 benchmarks/gpu/layer_jit_hlo.py > $L/hlo_$v.log 2>&1
    grep "^forward" $L/hlo_$v.log > $OUT/hlo_$v.txt || tail -5 $L/hlo_$v.log; done
  diff $OUT/hlo_0.txt $OUT/hlo_1.txt && echo "compiled ops equal:" && cat $OUT/hlo_0.txt
  i=0; for v in ${ORDER:-0 1 0 1}; do i=$((i + 1))
    [ $((T - SECONDS)) -gt 130 ] || { echo "no time left for run $i"; break; }
    JAXLLM_EXECUTABLE_CACHE_DIR= JAXLLM_LAYER_JIT=$v timeout 240 python3 benchmarks/latency.py \
      --engine jaxllm --contexts 1024 --prefill 2048 --num-scheduler-steps 4 --repeats 5 \
      --out $OUT/latency.jsonl > $L/lat_${i}_$v.log 2>&1
    P="programs lowered in [0-9.]* s\|compiled [0-9]* step programs.* in [0-9.]* s"
    echo "layer jit $v: $(grep -ho "$P\|decode ctx.*\|TTFT.*" $L/lat_${i}_$v.log | tr '\n' ';')"
  done
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
coldab)  # nvidia-h200 (one GPU), one call (issue 9's cold start, bound by XLA's compiles since
  # the layer jit: RESULTS "Rerun of 2026-12-04 (18:19)"): bf16 8B `jaxllm serve` started with
  # empty compilation and executable caches (the page cache kept: the compiles are the subject)
  # under each of VARIANTS, space-separated environment settings ("base" = none; a variant of
  # several settings joins them with "+"). Default: the engine as it is, bf16's buckets of >=
  # 2048 tokens on cuBLAS, XLA's autotuning at level 1. A variant that wins must then keep its
  # throughput and latency (offline_throughput.py / latency.py with the same setting).
  # Carry .whl and .bench.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  L=$OUT/logs; mkdir -p $L; C=/tmp/ckpt8b
  [ -f $C/config.json ] || python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer \
    || exit 1
  VARIANTS=${VARIANTS:-base JAXLLM_CUBLAS_MIN_TOKENS=2048 XLA_FLAGS=--xla_gpu_autotune_level=1}
  for v in $VARIANTS; do
    [ $((T - SECONDS)) -gt 130 ] || { echo "no time left for $v"; break; }
    E=$(echo "$v" | tr '+' ' '); [ "$v" = base ] && E="AB_BASE=1"
    D=$L/$(echo "$v" | tr -c 'A-Za-z0-9\n' _)
    env $E timeout $((T - SECONDS - 10)) python3 benchmarks/startup.py --out $OUT/startup.jsonl \
      serve $C --runs 1 --cache-dir /tmp/xla-coldab --log-dir $D \
      --note "cold compiles, page cache warm; $v"
  done
  grep -H "lowered\|ready" $L/*/serve_0.log | cut -c1-260
  tar czf $OUT/logs.tgz -C $OUT logs && rm -r $L ;;
structured)  # nvidia-h200 (one GPU), one call: structured outputs and late sampling on the 8B
  # checkpoint (random bf16 weights, SmolLM2's tokenizer) at batch B (default 256):
  # benchmarks/structured_outputs.py --engine (free; one presence-penalty row; all rows
  # constrained to a JSON schema; the last two also read back before the next schedule, the
  # order before late sampling). Carry .whl (with llguidance's wheel) and .bench.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  C=/tmp/ckpt8b
  [ -f $C/config.json ] || python3 benchmarks/startup.py write $C --tokenizer .bench/tokenizer \
    || exit 1
  timeout $((T - SECONDS - 10)) python3 benchmarks/structured_outputs.py --engine --model $C \
    --batch ${B:-256} --max-tokens 128 --engine-repeats 2 --json $OUT/structured.json ;;
h100verdict)  # nvidia-h100-x1, one call (issue 9 on the H100 it names): offline throughput,
  # 1,000 x 512/128 at the defaults, jaxllm then HF transformers' generate (the peer) in the
  # same call; then bf16 batch-1 latency against the same run's roofline. No wheels needed.
  L=$OUT/logs; mkdir -p $L
  timeout 220 $TP > $L/tp_bf16.log 2>&1
  grep -h "start-up\|tok/s" $L/tp_bf16.log | cut -c1-300
  timeout $((T - SECONDS - 100)) python3 benchmarks/throughput.py --engine hf --workload fixed \
    --repeats 1 --out $OUT/results.jsonl > $L/tp_hf.log 2>&1
  grep -h "tok/s" $L/tp_hf.log | cut -c1-300
  timeout 90 $LAT1K --num-scheduler-steps 4 > $L/lat_bf16.log 2>&1
  grep -h "decode ctx" $L/lat_bf16.log
  show_logs 6 ;;
lora)  # one GPU, one call: LoRA's decode cost on the 8B shape (benchmarks/lora.py: plain
  # engine, LoRA engine with no adapter / one / 4 mixed, rank 16 on every projection, batch 1
  # and 32 at 1k context), then the GPU tests (the LoRA one included). Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  timeout 300 python3 benchmarks/lora.py --shape llama3-8b --batch 1 32 --context 1024 \
    --tokens 32 --out $OUT/lora.jsonl > $L/lora.log 2>&1
  echo "rc=$?"; quiet < $L/lora.log | grep -v '^\[' | tail -9
  gpu_tests 8
  show_logs 4 ;;
lora2)  # nvidia-h100-x1, one call: LoRA's decode cost under four formulations of the delta
  # (benchmarks/lora.py --impl: each its own LoRA engine over the same slots, the plain engine
  # timed first and last), then one profile of the batch-256 decode step (issue 9's host idle).
  L=$OUT/logs; mkdir -p $L
  timeout 340 python3 benchmarks/lora.py --shape llama3-8b --batch 1 32 --context 1024 \
    --tokens 32 --impl flat einsum32 einsum16 flat32 --out $OUT/lora.jsonl > $L/lora.log 2>&1
  echo "rc=$?"; quiet < $L/lora.log | grep -v '^\[' | tail -22
  idle256 1
  show_logs 4 ;;
lora3)  # nvidia-h100-x1, one call: LoRA's decode cost with specialize_lora (adapter-free steps
  # run the programs without the LoRA path; the adapters' steps the LoRA path, as before),
  # then the LoRA GPU test. Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  timeout 300 python3 benchmarks/lora.py --shape llama3-8b --batch 1 32 --context 1024 \
    --tokens 32 --out $OUT/lora.jsonl > $L/lora.log 2>&1
  echo "rc=$?"; quiet < $L/lora.log | grep -v '^\[' | tail -8
  gpu_tests 4 -k lora
  show_logs 3 ;;
h100fp8)  # nvidia-h100-x1, one call (issues 6 and 5 on the H100 they name): the fp8 batch-1
  # step kernel by kernel (profile, 4 steps a launch), fp8 batch 1 at the defaults against the
  # MLP kernel in W8A8 (`mlp_kernel`: the H200 found it 1% slower, its W8A8 reads e4m3 at ~3.4
  # TB/s, the H100's whole bandwidth), alternating rounds; then the skinny fp8 GEMMs against
  # XLA's bf16 GEMM in GPU time (issue 5's small-M target).
  L=$OUT/logs; mkdir -p $L
  timeout 90 python3 benchmarks/profile_step.py --context 1024 --steps 6 --top 16 --batch 1 \
    --max-num-seqs 8 --num-scheduler-steps 4 --quantization fp8 --out-dir /tmp/po \
    --out $OUT/results.jsonl > $L/prof_fp8_d.log 2>&1
  grep -A18 "^batch " $L/prof_fp8_d.log | cut -c1-120
  LAT_Q=fp8 lat_rounds '{"mlp_kernel": true}' mk 2 70 200
  timeout $((T - SECONDS - 15)) python3 benchmarks/gpu/skinny_gemm.py --impls pallas_w8a8 \
    --budget $((T - SECONDS - 120)) --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; grep "best=\|impl=xla" $L/skinny.log | cut -c1-200
  show_logs 3 ;;
h100k)  # nvidia-h100-x1, one call (issues 5 and 6 on the H100): the skinny GEMM's in-kernel
  # split-K sum (GPU test, then the W8A8 sweep with and without it against XLA), then offline
  # throughput (1,000 x 512/128 at the defaults) bf16, fp8, fp8 + fp8 KV. Carry .bench, .whl.
  # Run 2026-12-05 18:25; the in-kernel sum (pallas_w8a8_inline) was no faster and was removed
  # after it (RESULTS), so the sweep now times pallas_w8a8 alone.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  gpu_tests 3 -k skinny; T0=$SECONDS
  timeout 230 python3 benchmarks/gpu/skinny_gemm.py --impls pallas_w8a8,pallas_w8a8_inline \
    --budget 170 --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$? $((SECONDS - T0)) s"; sed -n '/== summary/,$p' $L/skinny.log
  timeout 130 $TP > $L/tp_bf16.log 2>&1
  timeout 130 $TP --quantization fp8 > $L/tp_fp8.log 2>&1
  timeout $((T - SECONDS - 15)) $TP --quantization fp8 --kv-cache-dtype fp8 > $L/tp_fp8kv.log 2>&1
  grep -h "sized\|KV pages\|start-up\|tok/s" $L/tp_*.log | cut -c1-300
  show_logs 3 ;;
h100next)  # nvidia-h100-x1, one call (run 2026-12-06 00:00; RESULTS): the block-wise fp8
  # and fp8-pages GPU tests (e5m2 pages compiled for the first time),
  # then the block forms' sweep (w8a16, the engine's default,
  # against w8a8 and the bf16 dot: which form block-wise checkpoints should run at which M),
  # then issue 5's two H100 rows not yet read in GPU time: the decode-attention grid and the
  # fp8 GEMMs (M = 256 / 4096 are its last rows). Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  gpu_tests 3 -k "block_fp8 or fp8_pages"
  timeout 170 python3 benchmarks/kernels.py --sections block_gemm --budget 120 --device-time \
    --loop-reps 0 --out $OUT/results.jsonl > $L/block_gemm.log 2>&1
  echo "rc=$?"; sed -n '/== best per shape/,$p' $L/block_gemm.log | cut -c1-220
  timeout 170 python3 benchmarks/kernels.py --sections decode --budget 130 --device-time \
    --out $OUT/results.jsonl > $L/decode.log 2>&1
  echo "rc=$?"; sed -n '/== best per shape/,$p' $L/decode.log | cut -c1-220
  timeout $((T - SECONDS - 15)) python3 benchmarks/kernels.py --sections gemm \
    --budget $((T - SECONDS - 60)) --device-time --out $OUT/results.jsonl > $L/gemm.log 2>&1
  echo "rc=$?"; sed -n '/== best per shape/,$p' $L/gemm.log | cut -c1-220
  show_logs 3 ;;
block2)  # one GPU, one call (run on the H100 2026-12-06 00:10; RESULTS): batch-1 latency and
  # offline throughput (1,000 x 512/128) of per-channel fp8 and the two block forms.
  L=$OUT/logs; mkdir -p $L
  B="--fp8-weight-block 128,128"
  JAXLLM_FP8_BLOCK_GEMM=w8a8 timeout 110 $LAT1K --num-scheduler-steps 4 --quantization fp8 \
    $B > $L/lat_b8_r2.log 2>&1
  timeout 110 $LAT1K --num-scheduler-steps 4 --quantization fp8 $B > $L/lat_b16_r2.log 2>&1
  timeout 100 $LAT1K --num-scheduler-steps 4 --quantization fp8 > $L/lat_ch_r2.log 2>&1
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  timeout 110 $TP --quantization fp8 > $L/tp_ch.log 2>&1
  timeout 120 $TP --quantization fp8 $B > $L/tp_b16.log 2>&1
  JAXLLM_FP8_BLOCK_GEMM=w8a8 timeout $((T - SECONDS - 15)) $TP --quantization fp8 $B \
    > $L/tp_b8.log 2>&1
  for f in $L/tp_*.log; do echo "$f $(grep -h "tok/s" $f | cut -c1-250)"; done
  show_logs 3 ;;
blockfix)  # one GPU, one call (2026-12-06): block-wise fp8 at decode through the skinny kernel
  # with block scales (the XLA form wrote the dequantized weight: 14.6 ms/token at batch 1 on
  # the H100 against per-channel fp8's 3.6). In priority order, each step only while T leaves
  # room: its GPU tests, batch-1 latency block W8A16 / per-channel / block W8A8, the M <= 64
  # sweep (skinny tiles vs XLA's forms vs bf16), block W8A16 throughput. Carry .bench, .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  room() { [ $((T - SECONDS)) -gt $1 ]; }
  gpu_tests 3 -k "block_fp8"
  B="--fp8-weight-block 128,128"
  room 60 && timeout 80 $LAT1K --num-scheduler-steps 4 --quantization fp8 $B \
    > $L/lat_b16.log 2>&1
  room 50 && timeout 70 $LAT1K --num-scheduler-steps 4 --quantization fp8 > $L/lat_ch.log 2>&1
  room 60 && JAXLLM_FP8_BLOCK_GEMM=w8a8 timeout 80 $LAT1K --num-scheduler-steps 4 \
    --quantization fp8 $B > $L/lat_b8.log 2>&1
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  room 60 && timeout $((T - SECONDS - 10)) python3 benchmarks/kernels.py --sections \
    block_gemm --gemm-ms 1,16,64 --budget $(((T - SECONDS) / 3)) --device-time --loop-reps 0 \
    --out $OUT/results.jsonl > $L/block_gemm.log 2>&1
  echo "rc=$?"
  room 120 && timeout $((T - SECONDS - 10)) $TP --quantization fp8 $B > $L/tp_b16.log 2>&1
  for f in $L/tp_*.log; do echo "$f $(grep -h "tok/s" $f | cut -c1-250)"; done
  grep "impl=" $L/block_gemm.log | grep -v "error" | sed 's/ gbps=.*device_us=/ dev=/' \
    | cut -c1-160 ;;
gemmrows)  # one GPU, one call (2026-12-06): issue 5's GEMM rows the H100 call of 2026-12-06
  # 00:00 cut, gate/up and down at M = 64 .. 4096 (bf16, cuBLASLt fp8, the engine's fp8_linear,
  # Pallas fp8_matmul's sweep), then bf16 and fp8 batch-1 latency (the stricter floor beside
  # the roofline: the bytes a step reads). Carry .bench, .whl.
  L=$OUT/logs; mkdir -p $L
  timeout $((T - 170)) python3 benchmarks/kernels.py --sections gemm --gemm-kn \
    4096x28672,14336x4096 --gemm-ms 64,256,1024,4096 --budget $((T / 3)) --device-time \
    --loop-reps 0 --out $OUT/results.jsonl > $L/gemm.log 2>&1
  echo "rc=$?"
  timeout 75 $LAT1K --num-scheduler-steps 4 > $L/lat_bf16.log 2>&1
  timeout 70 $LAT1K --num-scheduler-steps 4 --quantization fp8 > $L/lat_fp8.log 2>&1
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  grep -E "^gemm |best pallas|cases," $L/gemm.log | cut -c1-250 ;;
blockmgpu)  # one GPU, one call (2026-12-06): the Mosaic GPU block-scaled W8A8 kernel
  # (pallas_kernels/fp8_block_mgpu.py) at M = 128 .. 4096 against XLA's w8a16 form (default,
  # cuBLAS as the engine compiles >= 32 tokens, Triton without a cuBLAS fallback) and bf16; its
  # GPU tests and the block skinny tests first (K: pytest -k, default block_fp8; MS: the M
  # values; IMPLS: kernels.py --block-impls). Carry .bench, .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  room() { [ $((T - SECONDS)) -gt $1 ]; }
  gpu_tests 4 -k "${K:-block_fp8}"
  room 60 && JAXLLM_FP8_BLOCK_MGPU=128,4,1 timeout $((T - SECONDS - 10)) python3 \
    benchmarks/kernels.py --sections block_gemm --gemm-ms ${MS:-128,256,1024,4096} \
    --block-skip-triton --budget $(((T - SECONDS) / 2)) --device-time --loop-reps 0 \
    ${IMPLS:+--block-impls $IMPLS} --out $OUT/results.jsonl > $L/block_gemm.log 2>&1
  echo "rc=$?"
  grep "impl=" $L/block_gemm.log | grep -v "error" | sed 's/ gbps=.*device_us=/ dev=/' \
    | cut -c1-170 | grep -v "skinny_block" ;;
blockorder)  # one GPU, one call (2026-12-06): the Mosaic GPU block kernel's tile order
  # (group_m), 2-CTA clusters sharing the weight tile (cluster_m) and two K blocks a step
  # (k_blocks) at the prompt steps' 16,384 rows (MS), every 8B shape, the kernel alone
  # (CONFIGS: kernels.py --mgpu-configs); its GPU tests first (K: pytest -k). Carry .bench,
  # .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  gpu_tests 4 -k "${K:-block_fp8_mgpu}"
  C=${CONFIGS:-"128,4,1,0,1;128,2,2,0,1;128,4,1,8,1;128,4,1,16,1;128,4,1,0,2;128,4,1,8,2;128,2,2,8,2;128,2,2,16,2"}
  room() { [ $((T - SECONDS)) -gt $1 ]; }
  room 60 && timeout $((T - SECONDS - 10)) python3 benchmarks/kernels.py --sections block_gemm \
    --gemm-ms ${MS:-16384} --block-skip-triton --budget $((T - SECONDS)) --device-time \
    --loop-reps 0 --block-impls mgpu_block_w8a8 --mgpu-configs "$C" \
    --out $OUT/results.jsonl > $L/block_order.log 2>&1
  echo "rc=$?"
  grep "impl=" $L/block_order.log | grep -v "error" | sed 's/ gbps=.*device_us=/ dev=/' \
    | cut -c1-200
  grep -i "error\|Traceback" $L/block_order.log | head -5 ;;
blockorder2)  # one GPU, one call (2026-12-06): blockorder's sweep at the decode steps' rows
  # (MS, default 1024,4096; CONFIGS), then block-wise fp8 offline throughput (1,000 x 512/128)
  # with the kernel at TILE (default 128,2,2,8,2) against its tile by shape (auto). Carry .bench.
  L=$OUT/logs; mkdir -p $L
  room() { [ $((T - SECONDS)) -gt $1 ]; }
  C=${CONFIGS:-"128,4,1,0,1;128,2,2,8,2;128,4,1,8,2;128,2,2,8,1"}
  timeout 150 python3 benchmarks/kernels.py --sections block_gemm --gemm-ms ${MS:-1024,4096} \
    --block-skip-triton --budget 140 --device-time --loop-reps 0 --block-impls mgpu_block_w8a8 \
    --mgpu-configs "$C" --out $OUT/results.jsonl > $L/block_order.log 2>&1
  echo "rc=$?"
  grep "impl=" $L/block_order.log | grep -v "error" | sed 's/ gbps=.*device_us=/ dev=/' \
    | sed 's/block_gemm: //; s/block_k=128 impl=//; s/ rel_err.*time_us=/ wall=/' | cut -c1-160
  B="--fp8-weight-block 128,128"
  room 200 && JAXLLM_FP8_BLOCK_MGPU=${TILE:-128,2,2,8,2} timeout 200 $TP --quantization fp8 $B \
    > $L/tp_tile.log 2>&1
  room 200 && JAXLLM_FP8_BLOCK_MGPU=auto timeout 200 $TP --quantization fp8 $B \
    > $L/tp_auto.log 2>&1
  tp_rows; show_logs 4 ;;
blocktp)  # one GPU, one call (2026-12-06): block-wise fp8 offline throughput (1,000 x 512/128)
  # with the Mosaic GPU kernel above 64 rows (TILE: JAXLLM_FP8_BLOCK_MGPU, default auto)
  # against XLA's w8a16 form, then the block batch-1 step's profile. Carry .bench, .whl.
  L=$OUT/logs; mkdir -p $L
  room() { [ $((T - SECONDS)) -gt $1 ]; }
  B="--fp8-weight-block 128,128"
  JAXLLM_FP8_BLOCK_MGPU=${TILE:-auto} timeout 200 $TP --quantization fp8 $B \
    > $L/tp_mgpu.log 2>&1
  room 150 && JAXLLM_FP8_BLOCK_MGPU=0 timeout 200 $TP --quantization fp8 $B > $L/tp_xla.log 2>&1
  tp_rows
  room 80 && timeout 90 python3 benchmarks/profile_step.py --context 1024 --steps 6 --batch 1 \
    --max-num-seqs 8 --num-scheduler-steps 4 --quantization fp8 $B --out-dir /tmp/prof \
    --out $OUT/results.jsonl > $L/prof_b1.log 2>&1
  show_logs 24 ;;
mgpuskinny)  # one GPU, one call (2026-12-06): issue 5's fp8 GEMMs at M <= 64 through the Mosaic
  # GPU per-channel W8A8 kernel (pallas_kernels/fp8_skinny_mgpu.py: TMA pipeline, no split-K):
  # its GPU test first (a wrong TMA bound hangs: own timeout), then skinny_gemm.py's XLA rows,
  # the Triton skinny kernel's sweep and the Mosaic kernel's tiles at every M (IMPLS).
  L=$OUT/logs; mkdir -p $L
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k skinny_mgpu > $L/gpu_tests.log 2>&1
  echo "rc=$?"; grep -v "^\s*$" $L/gpu_tests.log | tail -6
  timeout $((T - SECONDS - 10)) python3 benchmarks/gpu/skinny_gemm.py \
    --impls ${IMPLS:-mgpu_w8a8,pallas_w8a8} --budget ${BUDGET:-120} --ms ${MS:-16,64,1,8} \
    --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; grep "best=" $L/skinny.log | cut -c1-200; sed -n '/== summary/,$p' $L/skinny.log
  show_logs 3 ;;
mgpub1)  # one GPU, one call (2026-12-06): the engine with the Mosaic skinny kernel for its W8A8
  # steps of <= 64 rows: the kernel's and the fp8 engine's GPU tests, then fp8 batch 1 (issue
  # 6) at the defaults (W8A16 through XLA at <= 16 rows) against W8A8 at every step
  # (JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=0: the batch-1 GEMMs through the kernel), alternating
  # rounds (R, default 2). Carry .bench.
  L=$OUT/logs; mkdir -p $L
  gpu_tests 4 -k "skinny_mgpu or engine_fp8"
  for i in $(seq 1 ${R:-2}); do
    for v in $([ $((i % 2)) = 1 ] && echo "d w8a8" || echo "w8a8 d"); do
      [ $((T - SECONDS)) -gt 110 ] || break
      if [ $v = w8a8 ]; then export JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS=0
      else unset JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS; fi
      timeout 150 $LAT1K --quantization fp8 --num-scheduler-steps 4 > $L/lat_fp8_${v}_r$i.log 2>&1
    done; done
  unset JAXLLM_FP8_WEIGHT_ONLY_MAX_TOKENS
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f)"; done
  show_logs 3 ;;
mgpub64)  # one GPU, one call (2026-12-06): the fp8 decode steps of 32 / 64 rows (W8A8) with the
  # Mosaic skinny kernel (the default) against XLA's fp8 dot (cuBLASLt; JAXLLM_FP8_SKINNY_MGPU
  # =0), step profiles at 1k context, 4 steps a launch, alternating (BATCHES, default 64 32).
  L=$OUT/logs; mkdir -p $L
  for b in ${BATCHES:-64 32}; do
    for v in $([ $b = 64 ] && echo "d off" || echo "off d"); do
      [ $((T - SECONDS)) -gt 100 ] || break
      if [ $v = off ]; then export JAXLLM_FP8_SKINNY_MGPU=0; else unset JAXLLM_FP8_SKINNY_MGPU; fi
      prof_fp8 $b b${b}_$v
    done; done
  unset JAXLLM_FP8_SKINNY_MGPU
  for f in $L/prof_*.log; do echo "== $f"; grep -A9 "^batch " $f | cut -c1-130; done
  show_logs 2 ;;
mgpuw16)  # one GPU, one call (2026-12-06): the Mosaic skinny kernel's weight-only form (W8A16:
  # the e4m3 chunks upcast in registers, wgmma's A operand): its GPU test, then fp8 batch 1
  # (issue 6) with it against XLA's W8A16 (JAXLLM_FP8_SKINNY_MGPU=0), alternating rounds (R,
  # default 2), then skinny_gemm.py's rows at M <= 16. Run at c7f57fb, whose engine took the
  # form at <= 16 rows (measured slower, taken out after: restore that call before an A/B).
  # Carry .bench.
  L=$OUT/logs; mkdir -p $L
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k skinny_mgpu > $L/gpu_tests.log 2>&1
  echo "rc=$?"; grep -v "^\s*$" $L/gpu_tests.log | tail -4
  for i in $(seq 1 ${R:-2}); do
    for v in $([ $((i % 2)) = 1 ] && echo "d xla" || echo "xla d"); do
      [ $((T - SECONDS)) -gt 90 ] || break
      if [ $v = xla ]; then export JAXLLM_FP8_SKINNY_MGPU=0; else unset JAXLLM_FP8_SKINNY_MGPU; fi
      timeout 100 $LAT1K --quantization fp8 --num-scheduler-steps 4 > $L/lat_fp8_${v}_r$i.log 2>&1
    done; done
  unset JAXLLM_FP8_SKINNY_MGPU
  for f in $L/lat_*.log; do echo "$f $(grep -h "ms/token" $f | cut -c1-150)"; done
  timeout $((T - SECONDS - 5)) python3 benchmarks/gpu/skinny_gemm.py --impls ${IMPLS:-mgpu_w8a16} \
    --ms ${MS:-1,8,16} --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; sed -n '/== summary/,$p' $L/skinny.log | grep -v " 64 "
  grep "best=" $L/skinny.log | cut -c1-160
  show_logs 2 ;;
mgpuwgs)  # one GPU, one call (2026-12-06 evening): the skinny Mosaic kernel's weight-only form
  # at 1, 2 and 4 compute warpgroups (each takes its share of a step's 128-wide chunks: the
  # register upcast no longer serialized on one warpgroup), bf16 and float16 rows, against
  # XLA's W8A16 and the kernel's W8A8 form: its GPU test, then skinny_gemm.py at M = 1, 8.
  L=$OUT/logs; mkdir -p $L
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k skinny_mgpu > $L/gpu_tests.log 2>&1
  echo "rc=$?"; grep -v "^\s*$" $L/gpu_tests.log | tail -4
  timeout $((T - SECONDS - 5)) python3 benchmarks/gpu/skinny_gemm.py \
    --impls ${IMPLS:-mgpu_w8a16,mgpu_w8a16_f16,mgpu_w8a8} --mgpu-tiles "${TILES:-512,3;256,6}" \
    --ms ${MS:-1,8} --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; sed -n '/== summary/,$p' $L/skinny.log | grep -v " 64 \| 16 "
  grep "best=" $L/skinny.log | cut -c1-160
  show_logs 2 ;;
woab)  # one GPU, one call (2026-12-06 evening): fp8 batch 1 (issue 6) with the skinny Mosaic
  # kernel's weight-only form (JAXLLM_FP8_SKINNY_MGPU_WO: compute warpgroups, o / down alone,
  # float16 rows; the o / down residual adds in its epilogue) against XLA's W8A16 (the
  # default, "xla"), VARIANTS in turn,
  # R rounds (default 1), then skinny_gemm.py's weight-only rows at MS (default 1) if time is
  # left.
  L=$OUT/logs; mkdir -p $L
  # tile_k,steps,compute_wgs[,residual_only[,f16]]; run on 2026-12-06 evening as
  # "xla 512,3,2 512,3,4" (the last compile ran past the old 120 s) and "512,3,2,0,1 xla".
  fp8_b1_ab JAXLLM_FP8_SKINNY_MGPU_WO "${VARIANTS:-512,3,2,1,1 512,3,4,0,1 xla}"
  [ $((T - SECONDS)) -gt 60 ] && timeout $((T - SECONDS - 5)) python3 \
    benchmarks/gpu/skinny_gemm.py --impls ${IMPLS:-mgpu_w8a16,mgpu_w8a16_f16,mgpu_w8a8} \
    --mgpu-tiles "${TILES:-512,3;256,6}" --ms ${MS:-1} --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; sed -n '/== summary/,$p' $L/skinny.log | grep -v " 64 \| 16 \| 8 "
  grep "best=" $L/skinny.log | cut -c1-160
  show_logs 2 ;;
resab)  # one GPU, one call (2026-12-06 evening): the o / down residual adds in the skinny
  # Mosaic kernel's epilogue (the default) against an XLA add after it
  # (JAXLLM_FP8_SKINNY_RESIDUAL=0) in the fp8 decode steps of 32 / 64 rows (BATCHES), step
  # profiles at 1k context; the epilogue's GPU test first; then the weight-only form's rows at
  # M = 1 for the o, gate/up and down shapes (skinny_gemm.py) if time is left.
  L=$OUT/logs; mkdir -p $L
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k residual_epilogue > $L/gpu_tests.log 2>&1
  echo "rc=$?"; grep -v "^\s*$" $L/gpu_tests.log | tail -4
  for b in ${BATCHES:-32}; do
    for v in on off; do
      [ $((T - SECONDS)) -gt 100 ] || break
      export JAXLLM_FP8_SKINNY_RESIDUAL=$([ $v = on ] && echo 1 || echo 0)
      prof_fp8 $b b${b}_$v
    done; done
  unset JAXLLM_FP8_SKINNY_RESIDUAL
  for f in $L/prof_*.log; do echo "== $f"; grep -A9 "^batch " $f | cut -c1-130; done
  [ $((T - SECONDS)) -gt 40 ] && timeout $((T - SECONDS - 5)) python3 \
    benchmarks/gpu/skinny_gemm.py --impls mgpu_w8a16 --shapes ${SHAPES:-o,down,gate_up} \
    --mgpu-tiles "512,3" --ms 1 --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  grep -h "device_us" $L/skinny.log | grep -v best \
    | sed 's/ rel_err=[^ ]*//; s/ ops_per_call.*weight/ weight/' | cut -c1-170
  show_logs 2 ;;
wob1prof)  # one GPU, one call (2026-12-06 evening): where batch 1 through the skinny Mosaic
  # kernel's weight-only form (JAXLLM_FP8_SKINNY_MGPU_WO=512,3,2,0,1) loses 0.14 ms a token to
  # XLA's W8A16 GEMMs: the fp8 batch-1 step profiled (1k context, 4 steps a launch, top 16
  # kernels) with the variable, then without. Logs straight into $OUT (a cut call keeps them).
  # VAR: another variable to set to each of VARIANTS (e.g. JAXLLM_FP8_SKINNY_MGPU_QX).
  VAR=${VAR:-JAXLLM_FP8_SKINNY_MGPU_WO}
  for v in ${VARIANTS:-512,3,2,0,1 xla}; do
    [ $((T - SECONDS)) -gt 60 ] || break
    unset $VAR
    [ $v = xla ] || export "$VAR=$v"
    timeout $((T - SECONDS - 5)) python3 benchmarks/profile_step.py --context 1024 --steps 6 \
      --top 16 --batch 1 --max-num-seqs 1 --num-scheduler-steps 4 --quantization fp8 \
      --out-dir /tmp/po --out $OUT/results.jsonl > $OUT/prof_b1_$v.log 2>&1
    echo "== $v"; grep -A17 "^batch " $OUT/prof_b1_$v.log | cut -c1-120
  done; unset $VAR ;;
qxab)  # one GPU, one call (2026-12-06 night): fp8 batch 1 (issue 6) with the rows quantized
  # inside the skinny Mosaic kernel (JAXLLM_FP8_SKINNY_MGPU_QX=tile_k,steps,max_rows: W8A8 at
  # every projection of <= max_rows rows, no quantization kernel before it) against XLA's
  # W8A16 GEMMs (the default, "xla"): first the kernel at MS rows beside XLA's GEMMs
  # (skinny_gemm.py: checked against its reference, GPU time), then batch 1, VARIANTS in turn,
  # R rounds (default 1).
  L=$OUT/logs; mkdir -p $L
  timeout ${TS:-150} python3 benchmarks/gpu/skinny_gemm.py --impls ${IMPLS:-mgpu_w8a8_qx,mgpu_w8a8} \
    --mgpu-tiles "${TILES:-1024,2;512,3}" --ms ${MS:-1} --out $OUT/skinny.jsonl > $L/skinny.log 2>&1
  echo "rc=$?"; sed -n '/== summary/,$p' $L/skinny.log
  grep "qx" $L/skinny.log | grep -v "best=" | cut -c1-180
  fp8_b1_ab JAXLLM_FP8_SKINNY_MGPU_QX "${VARIANTS:-xla 1024,2,16}"
  [ $((T - SECONDS)) -gt 40 ] && timeout $((T - SECONDS - 10)) python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py -k quantizes_its_rows > $L/gpu_tests.log 2>&1
  echo "rc=$?"; grep -v "^\s*$" $L/gpu_tests.log | tail -4
  show_logs 2 ;;
qxsites)  # one GPU, one call (2026-12-06 late): the quantize_x GPU test (after the
  # two-warpgroup form's removal), then the fp8 batch-1 step profiled with a layer's ops in
  # order (profile_step.py --layer-sites: the four projections apart, where the per-name totals
  # lump them) for each of VARIANTS: xla (the default), qx=QX (JAXLLM_FP8_SKINNY_MGPU_QX),
  # wo=WO (JAXLLM_FP8_SKINNY_MGPU_WO). The step's wall (no profiler) is each one's ms/token.
  # Found (2026-12-06 22:00): each quantize_x call costs no more than XLA's GEMM plus the small
  # kernel it absorbs; the form loses XLA's launch overlap (RESULTS).
  # Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 150 python3 -m pytest -q -rA -m gpu \
    -p no:cacheprovider tests/test_gpu.py -k quantizes_its_rows > $L/gpu_qx.log 2>&1
  echo "rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $L/gpu_qx.log | tail -6
  for v in ${VARIANTS:-xla qx=1024,2,16 wo=512,3,2,1,1}; do
    [ $((T - SECONDS)) -gt 70 ] || break
    unset JAXLLM_FP8_SKINNY_MGPU_QX JAXLLM_FP8_SKINNY_MGPU_WO
    case $v in qx=*) export JAXLLM_FP8_SKINNY_MGPU_QX=${v#qx=} ;;
      wo=*) export JAXLLM_FP8_SKINNY_MGPU_WO=${v#wo=} ;; esac
    timeout $((T - SECONDS - 5)) python3 benchmarks/profile_step.py --context 1024 --steps 6 \
      --top 12 --batch 1 --max-num-seqs 1 --num-scheduler-steps 4 --quantization fp8 \
      --layer-sites --out-dir /tmp/po --out $OUT/results.jsonl > $L/prof_${v%%=*}.log 2>&1
    echo "== $v"; grep -A40 "^batch " $L/prof_${v%%=*}.log | cut -c1-110
  done; unset JAXLLM_FP8_SKINNY_MGPU_QX JAXLLM_FP8_SKINNY_MGPU_WO ;;
pfab)  # one GPU, one call (2026-12-06 late): the decode kernel streaming the o weight into
  # the L2 under its latency-bound work (JAXLLM_ATTENTION_KNOBS {"l2_prefetch_o": AT}): the GPU
  # tests that compile it (the kernel's bits with and without, the engine's greedy tokens), then
  # the batch-1 step profiled with a layer's ops in order (the attention's and the o GEMM's
  # time) for each AT of VARIANTS (off = the default), fp8 then bf16 (BF16_VARIANTS). The
  # step's wall (no profiler) is each one's ms/token. Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 200 python3 -m pytest -q -rA -m gpu \
    -p no:cacheprovider tests/test_gpu.py -k "rope_from_the_qkv_output or fused_qkv_rope_serves" \
    > $L/gpu_pf.log 2>&1
  echo "rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" $L/gpu_pf.log | tail -8
  for qv in $(for v in ${VARIANTS:-off start end}; do echo fp8:$v; done) \
            $(for v in ${BF16_VARIANTS:-off start}; do echo bf16:$v; done); do
    [ $((T - SECONDS)) -gt 60 ] || break
    q=${qv%%:*}; at=${qv#*:}
    export JAXLLM_ATTENTION_KNOBS="{\"l2_prefetch_o\": \"$at\"}"
    timeout $((T - SECONDS - 5)) python3 benchmarks/profile_step.py --context 1024 --steps 6 \
      --top 6 --batch 1 --max-num-seqs 1 --num-scheduler-steps 4 \
      $([ $q = fp8 ] && echo --quantization fp8) --layer-sites --out-dir /tmp/po \
      --out $OUT/results.jsonl > $L/prof_${q}_$at.log 2>&1
    echo "== $q $at"; grep -A20 "^batch " $L/prof_${q}_$at.log | cut -c1-110
  done; unset JAXLLM_ATTENTION_KNOBS ;;
gpuall)  # one GPU: tests/test_gpu.py, PART=i/n (default 1/1) of its tests in collection
  # order, so the file can be run over several calls: on 2026-12-07 the whole file (70 tests)
  # no longer fit one call (the first 37 took ~400 s on the H100; the Mosaic GPU kernels'
  # tests compile a kernel per tile and form on the host). PART=1/3, 2/3, 3/3: three calls.
  # FROM=ID: the tests from the first whose id contains ID on (before PART splits them).
  # Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  IFS=/ read -r PI PN <<< "${PART:-1/1}"
  [[ "$PN" =~ ^[1-9][0-9]*$ && "$PI" =~ ^[1-9][0-9]*$ && $PI -le $PN ]] \
    || { echo "PART must be i/n with 1 <= i <= n, got '$PART'"; exit 2; }
  python3 -m pytest --collect-only -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>/dev/null \
    | grep "::" > /tmp/gpu_ids.txt
  if [ -n "$FROM" ]; then
    F0=$(grep -nF -- "$FROM" /tmp/gpu_ids.txt | head -1 | cut -d: -f1)
    [ -n "$F0" ] || { echo "FROM='$FROM' names no test"; exit 2; }
    [ $F0 -gt 1 ] && sed -i "1,$((F0 - 1))d" /tmp/gpu_ids.txt
  fi
  NT=$(wc -l < /tmp/gpu_ids.txt); A=$(( (PI - 1) * NT / PN + 1 )); B=$(( PI * NT / PN ))
  echo "part $PI/$PN: tests $A..$B of $NT"
  GPU_TEST_IDS=$(sed -n "${A},${B}p" /tmp/gpu_ids.txt | tr '\n' ' ') gpu_tests 4
  show_logs 3 ;;
xlaflags2)  # one GPU, one call (2026-12-07): XLA options found in this jaxlib's flag list and
  # never timed in the engine (the 2026-12-02 `xlaflags` call covered the fusion ones): the
  # fp8 batch-1 step profiled with a layer's ops in order (profile_step.py --layer-sites) for
  # each of FLAGS (';'-separated XLA_FLAGS values, "base" = none), the step's wall (no
  # profiler) being each one's ms/token. Found (2026-12-07, H100): gemm_fusion_v2, the
  # block-level rewriter and warp specialization leave the step as it is (RESULTS). Carry
  # .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  X=--xla_gpu_experimental
  IFS=';' read -ra FL <<< "${FLAGS:-base;${X}_gemm_fusion_v2=true}"
  i=0
  for f in "${FL[@]}"; do
    i=$((i + 1)); [ $((T - SECONDS)) -gt 80 ] || break
    [ "$f" = base ] && f=""
    echo "$f" > $L/prof_$i.log
    XLA_FLAGS="$f" timeout $((T - SECONDS - 5)) python3 benchmarks/profile_step.py \
      --context 1024 --steps 6 --top 12 --batch 1 --max-num-seqs 1 --num-scheduler-steps 4 \
      --quantization fp8 --layer-sites --out-dir /tmp/px$i --out $OUT/results.jsonl \
      >> $L/prof_$i.log 2>&1
    echo "== $i '$f' rc=$?"; grep -A40 "^batch " $L/prof_$i.log | cut -c1-110
  done ;;
b1table)  # one GPU (2026-12-07, issue 6): the batch-1 decode attention call alone over the
  # decode table's sweep (decode_b1.py --full, R rounds, default 2; the table was tuned on the
  # H200), then, with KNOBS (JAXLLM_ATTENTION_KNOBS JSON; unset: decode_b1's best_knobs;
  # '{}' skips it) fp8 batch 1 at the defaults against KNOBS, alternating, while time is left
  # (SKIP_SWEEP=1: the A/B only). best_knobs can be the table's own values spelled out (as on
  # the H100 on 2026-12-07): pass KNOBS='{}' then.
  L=$OUT/logs; mkdir -p $L
  if [ -z "$SKIP_SWEEP" ]; then decode_b1 --full --rounds ${R:-2}; fi
  K=${KNOBS:-$(grep -h '"best_knobs"' $L/decode_b1.log 2>/dev/null | tail -1 \
      | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["best_knobs"]))')}
  echo "knobs: $K"
  if [ -n "$K" ] && [ "$K" != "{}" ]; then LAT_Q=fp8 lat_rounds "$K" k ${AB_ROUNDS:-2} 170 140; fi
  show_logs 8 ;;
h100chain)  # one GPU, one call (2026-12-07, issue 6): mosaic_chain.py's persistent o chain
  # (xla / nosync / sync at 4x128x4) and grid_barrier.py (the barrier alone, then beside an
  # o layer's stream), both measured on the H200 only (2026-12-03 / 04), on this machine: the
  # whole-layer kernel's bar for fp8 batch 1 on an H100 (DESIGN_NOTES).
  timeout 150 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -8
  timeout 150 python3 benchmarks/gpu/grid_barrier.py --grids 128,132 --out $OUT/barrier.jsonl \
    2>&1 | grep -v '^{' | tail -10
  timeout 150 python3 benchmarks/gpu/grid_barrier.py --grids 128 --streams 0,8 \
    --forms none,signal,add_load --out $OUT/stream.jsonl 2>&1 | grep -v '^{' | tail -8 ;;
fp8chain)  # one GPU, one call (2026-12-07, issue 6): step 1 of the whole-layer kernel's plan
  # (DESIGN_NOTES): mosaic_chain_fp8.py's o chain over e4m3 weights (the activations quantized
  # per token in the kernel after each barrier) against XLA's chain of the engine's batch-1 fp8
  # projection; each form in a process of its own under a timeout (a wrong barrier hangs), then
  # the correct form called N times against its reference; first the bf16 chain beside it
  # (mosaic_chain.py, the same machine's boundary and body over bf16 weights).
  timeout 100 python3 benchmarks/gpu/mosaic_chain.py --variants xla,nosync,sync \
    --cands 4x128x4 --out $OUT/chain.jsonl 2>&1 | grep -v '^{' | tail -5
  F=benchmarks/gpu/mosaic_chain_fp8.py
  timeout 150 python3 $F --variants xla,sync --cands ${CANDS:-4x256x4} --out $OUT/fp8chain.jsonl \
    2>&1 | grep -v '^{' | tail -6
  timeout 120 python3 $F --variants nosync,sync_noq --cands ${CANDS:-4x256x4} \
    --out $OUT/fp8chain.jsonl 2>&1 | grep -v '^{' | tail -6
  timeout 120 python3 $F --stress ${N:-20} --variants sync --cands ${CANDS:-4x256x4} \
    --out $OUT/fp8stress.jsonl 2>&1 | tail -2 ;;
mlpchain)  # one GPU, one call (2026-12-07, issue 6): step 2 of the whole-layer kernel's plan
  # (DESIGN_NOTES): mosaic_mlp_fp8.py's persistent MLP pair over e4m3 weights against XLA's
  # chain of the engine's batch-1 fp8 MLP (with the RMSNorm, and without: `_nonorm`), each
  # form in a process of its own under a timeout (a wrong barrier hangs); first the gate/up
  # diagnosis (each layer's against the reference and its alternatives), last the correct
  # form called N times, every layer against the reference of its own input.
  F=benchmarks/gpu/mosaic_mlp_fp8.py
  C=${CANDS:-128x256x2x512,112x256x4x1024,112x128x8x1024}
  timeout 100 python3 $F --diagnose --layers 4 --cands $C --out $OUT/mlpdiag.jsonl 2>&1 \
    | grep '^{' | cut -c1-900
  timeout 180 python3 $F --variants xla,xla_nonorm,sync,sync_nonorm --cands $C \
    --out $OUT/mlpchain.jsonl 2>&1 | grep -v '^{' | tail -10
  timeout 120 python3 $F --variants nosync,nosync_noq --cands $C --out $OUT/mlpchain.jsonl \
    2>&1 | grep -v '^{' | tail -9
  timeout 150 python3 $F --stress ${N:-5} --cands $C --out $OUT/mlpstress.jsonl 2>&1 | tail -4 ;;
attnchain)  # one GPU, one call (2026-12-07, issue 6): step 3a of the whole-layer kernel's plan
  # (DESIGN_NOTES): mosaic_attn_fp8.py's persistent attention half (q/k/v with the norm |
  # rope, paged attention partials | o with their combine) against the engine's own attention
  # half (attn_half_engine.py), each in a process of its own under a timeout (a wrong barrier
  # hangs); last the correct form called N times, every phase against its reference.
  F=benchmarks/gpu/mosaic_attn_fp8.py
  C=${CANDS:-128x256x2,128x128x4}
  timeout 150 python3 benchmarks/gpu/attn_half_engine.py --layers 32 --ctx ${CTX:-1024} \
    --trace --out $OUT/attnengine.jsonl 2>&1 | grep -v '^{' | tail -3
  timeout 300 python3 $F --variants sync,nosync,sync_noattn,sync_perlayer --cands $C --ctx ${CTX:-1024} \
    --out $OUT/attnchain.jsonl 2>&1 | grep -v '^{\|Deprecat\|plgpu.load' | tail -8
  timeout 150 python3 $F --stress ${N:-3} --cands $C --ctx ${CTX:-1024} \
    --out $OUT/attnstress.jsonl 2>&1 | grep '^{' ;;
mlpmgpu)  # one GPU, one call (2026-12-07): the batch-1 fp8 MLP as one Mosaic GPU kernel split
  # over F (pallas_kernels/fp8_mlp_mgpu.py): its GPU check and the Llama-3-8B MLP chain against
  # the engine's XLA kernels at MS rows (benchmarks/gpu/fp8_mlp.py, CFGS: a JSON list of
  # config overrides also timed), then fp8 batch 1 in the engine with it
  # (JAXLLM_FP8_MLP_MGPU=8: latency.py's batch-1 steps are 8 rows; "8,1": its transposed
  # down GEMM; unset: the faster of the two in the chain) and without ("xla"), VARIANTS in
  # turn, R rounds, in the last ENGINE_S seconds (default 260). Carry .whl.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  timeout $((T - SECONDS - ${ENGINE_S:-260})) python3 benchmarks/gpu/fp8_mlp.py \
    --ms ${MS:-1,8} --budget $((T - SECONDS - ${ENGINE_S:-260} - 40)) --cfgs "${CFGS:-[]}" \
    --out $OUT/fp8_mlp.jsonl > $L/fp8_mlp.log 2>&1
  echo "rc=$?"; grep -v "^WARNING\|^I0000\|^E0000" $L/fp8_mlp.log | grep -v '"kind": "time"' \
    | tail -24
  # VARIANTS unset: "xla" and the faster form at 8 rows in the chain above, if it beats xla
  FORM=$(python3 -c "import json,sys; r={x['impl']: x['us_per_layer'] for x in map(json.loads,
open(sys.argv[1])) if x.get('M') == 8 and 'us_per_layer' in x}; f=min(('8', r.get('mgpu',
1e9)), ('8,1', r.get('mgpu_t', 1e9)), key=lambda v: v[1]); print(f[0] if f[1] < r.get('xla',
0) else '')" $OUT/fp8_mlp.jsonl)
  [ -n "${VARIANTS}${FORM}" ] || { echo "the kernel is not faster than XLA's: no engine run"; }
  [ -n "${VARIANTS}${FORM}" ] && fp8_b1_ab JAXLLM_FP8_MLP_MGPU "${VARIANTS:-xla $FORM}" ;;
b1mgpu)  # one GPU, one call (2026-12-07, issue 6's per-layer route): the engine's batch-1 fp8
  # step with each layer as pallas_kernels/fp8_decode_mgpu.py's attention half and MLP pair
  # (jaxllm/models/b1_mgpu.py, JAXLLM_FP8_B1_MGPU=1). First tests/test_b1_mgpu.py on the GPU
  # (the grid forms in the model's forward against the step's exact math, at Llama-3-8B's
  # residual; TESTS times, default 2: a race shows as a flaky run) under a timeout (a wrong
  # barrier hangs), then fp8 batch 1 at 1k context with the knob ("1") and without ("xla"),
  # VARIANTS in turn, R rounds, and the knob's step profiled if time is left. Carry .whl and
  # .bench.
  L=$OUT/logs; mkdir -p $L
  wheels || exit 1
  for i in $(seq 1 ${TESTS:-2}); do
    JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 200 python3 -m pytest -q \
      -p no:cacheprovider tests/test_b1_mgpu.py > $L/b1_tests_$i.log 2>&1
    echo "tests, run $i: rc=$?"; grep -v "^\s*$" $L/b1_tests_$i.log | tail -6
  done
  fp8_b1_ab JAXLLM_FP8_B1_MGPU "${VARIANTS:-xla 1}"
  # where the step's GPU time goes with the knob (its top kernels), while 130 s are left
  [ $((T - SECONDS)) -gt 130 ] && (export JAXLLM_FP8_B1_MGPU=1; prof_fp8 1 b1mgpu) \
    && grep -v "^WARNING\|^I0000" $L/prof_b1mgpu.log | tail -12 ;;
spec)  # nvidia-h200 (one GPU), one call: speculative decoding (n-gram drafts) on the 8B shape,
  # random bf16 weights, batch 1 at 1k context: plain vs k = 2 / 4 / 8, forced (every draft
  # accepted: the ceiling), random (nothing accepted: the cost) and sampled; then the GPU tests
  # (the speculative one included), bf16 batch-1 latency (4 steps a launch: no regression from
  # the speculative changes) and batch 4 at k = 4 if time is left. Carry .bench and .whl.
  L=$OUT/logs; mkdir -p $L
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit 1
  timeout $((T - SECONDS - 10)) python3 benchmarks/spec_decode.py --shape llama3-8b \
    --batch 1 --context 1024 --tokens 64 --num-speculative-tokens 2 4 8 \
    --out $OUT/spec_decode.jsonl 2>&1 | quiet | grep -v '^\[' | tail -12
  JAXLLM_TEST_TOKENIZER=$PWD/.bench/tokenizer timeout 200 python3 -m pytest -q -m gpu \
    -p no:cacheprovider tests/test_gpu.py > $L/gpu_tests.log 2>&1
  grep -v "^\s*$" $L/gpu_tests.log | tail -8
  timeout 90 $LAT1K --num-scheduler-steps 4 > $L/lat_bf16_k4.log 2>&1
  grep -h "ms/token" $L/lat_bf16_k4.log
  [ $((T - SECONDS)) -gt 120 ] && timeout $((T - SECONDS - 10)) python3 \
    benchmarks/spec_decode.py --shape llama3-8b --batch 4 --context 1024 --tokens 64 \
    --num-speculative-tokens 4 --out $OUT/spec_decode.jsonl 2>&1 | quiet | grep -v '^\[' \
    | tail -6
  show_logs 6 ;;
esac
