#!/bin/bash
# Profile decode steps on the GPU machine (default XLA flags, then command buffers off), then the
# offline throughput + batch-1 decode figures. Usage: bash benchmarks/gpu/profile.sh
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/profile_step.py --batch 1 64 256 --context 1024 --steps 10 --out-dir /tmp/prof_a \
  --out $OUT/profile.jsonl 2>&1 | grep -v "Compiling step" | tail -60
echo "== command buffers off"
XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/profile_step.py --batch 1 256 --context 1024 \
  --steps 10 --top 6 --out-dir /tmp/prof_b --out $OUT/profile_nocb.jsonl 2>&1 | grep -v "Compiling step" | tail -20
cp /tmp/prof_a/b1/plugins/profile/*/perfetto_trace.json.gz $OUT/trace_b1.json.gz
echo "== offline throughput"
python3 benchmarks/offline_throughput.py --engine jaxllm --out $OUT/offline.jsonl 2>&1 | grep -v "Compiling step\|it/s" | tail -5
