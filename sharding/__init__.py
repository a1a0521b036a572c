"""Meshes (dp, pp, tp), partition rules for params and the KV cache, pipeline stages, multi-host
start-up.

  mesh.py         the (dp, pp, tp) mesh, a replica's [pp, tp] devices, contiguous stage layers
  rules.py        the tensor-parallel partition table (params by HF path, KV cache by KV head),
                  KV-head replication, placing loaded tensors straight into their shards
  distributed.py  jax.distributed start-up, the leader -> follower step channel, run_follower

The engine side: ``jaxllm/engine/model_runner.py`` (tensor parallel steps),
``jaxllm/engine/pipeline_runner.py`` (one program per stage), ``jaxllm/engine/data_parallel.py``
(replicas). Design: docs/DESIGN_NOTES.md, "Sharding".
"""
