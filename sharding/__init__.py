"""Meshes (dp, pp, tp), partition rules for params and the KV cache, pipeline stages, multi-host
start-up. Empty until the sharding issue: the engine runs on one device today (params are named by
HF path so partition rules can match them; `jaxllm.loading.weights` takes a `place=` hook)."""
