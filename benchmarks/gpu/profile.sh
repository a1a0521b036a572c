#!/bin/bash
# Profile decode steps on the GPU machine: default XLA flags, then command buffers off.
set -x
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 benchmarks/profile_step.py --batch 1 64 256 --context 1024 --steps 10 --out-dir /tmp/prof_a \
  --out $OUT/profile.jsonl 2>&1 | grep -v "Compiling step" | tail -60
XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/profile_step.py --batch 1 --context 1024 \
  --steps 10 --out-dir /tmp/prof_b --out $OUT/profile_nocb.jsonl 2>&1 | grep -v "Compiling step" | tail -25
ls /tmp/prof_a/b1/plugins/profile/*/
cp /tmp/prof_a/b1/plugins/profile/*/perfetto_trace.json.gz $OUT/trace_b1.json.gz
