#!/bin/bash
# The performance issue's figures on the GPU machine, in parts that each fit one device call:
#   bash benchmarks/gpu/perf.sh latency      profile (GPU idle %) + latency sweep, jaxllm and HF
#   bash benchmarks/gpu/perf.sh tp-jaxllm    offline throughput, both workloads, jaxllm
#   bash benchmarks/gpu/perf.sh tp-hf        offline throughput, both workloads, HF (1 repeat)
# JSON lines go to $OUT; plots are made afterwards from them (--plot).
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
quiet() { grep -v "Compiling\|it/s\]" ; }
case "$1" in
latency)
  python3 benchmarks/profile_step.py --batch 1 256 --context 1024 --steps 10 --top 8 \
    --out-dir /tmp/prof --out $OUT/profile.jsonl 2>&1 | quiet | tail -30
  python3 benchmarks/latency.py --engine jaxllm --out $OUT/latency.jsonl 2>&1 | quiet | tail -14
  python3 benchmarks/latency.py --engine hf --out $OUT/latency.jsonl 2>&1 | quiet | tail -14 ;;
tp-jaxllm)
  for w in fixed sharegpt; do
    python3 benchmarks/throughput.py --engine jaxllm --workload $w --out $OUT/throughput.jsonl 2>&1 | quiet | tail -3
  done ;;
tp-hf)
  for w in fixed sharegpt; do
    python3 benchmarks/throughput.py --engine hf --workload $w --repeats 1 --out $OUT/throughput.jsonl 2>&1 | quiet | tail -3
  done ;;
esac
