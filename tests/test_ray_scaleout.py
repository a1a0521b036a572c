"""Ray Serve scale-out beyond one host per replica (server/ray_serve.py, server/ray_multihost.py,
server/ray_metrics.py) on a local two-node Ray cluster (``ray.cluster_utils.Cluster``: two
raylets on this machine, 1 CPU each), shared by the module:

- a replica spanning both nodes (``num_hosts_per_replica=2``): its placement group puts one bundle
  on each node (STRICT_SPREAD), the replica leads a jax.distributed job (gloo collectives, one CPU
  device per process, tensor_parallel_size=2 over both) and answers the greedy completions of a
  single-process engine;
- autoscaling from 1 to 2 replicas under concurrent long requests;
- the engine figures each replica exports through ``ray.util.metrics``.

The model is tests/helpers.py's 2-layer random Llama (fast to load on every process).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import types

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'jaxllm[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed "
                            "(pip install 'jaxllm[ray]')")

import aiohttp  # noqa: E402

from server.ray_serve import ENGINE_DEPLOYMENT, REPLICA_HEADER, build_app  # noqa: E402

from .helpers import small_llama_folder  # noqa: E402,F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_KW = dict(dtype="float32", max_model_len=96, num_pages=24, max_num_seqs=4,
                 token_buckets=(8, 32), skip_compile_at_start=True)
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of 1 CPU each; every process sees one CPU device (XLA_FLAGS), so a 2-host
    replica's tp=2 mesh has one device per process."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": {
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        # Handles and replicas report ongoing requests to the autoscaler every 1 s, not 10 s.
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def _reference(folder, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy texts from one single-device engine in this process."""
    from jaxllm import EngineConfig, SamplingParams
    from jaxllm.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(**ENGINE_KW, model=str(folder)))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    texts: dict[str, str] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
    return [texts[str(i)] for i in range(len(prompts))]


def _completions(url: str, prompts: list[str], max_tokens: int) -> list[tuple[int, str, str]]:
    """Concurrent non-streamed greedy completions: (status, replica, text or error body)."""
    async def one(s, p):
        body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0.0}
        async with s.post(url + "/v1/completions", json=body) as r:
            data = await r.json(content_type=None)
            text = data["choices"][0]["text"] if r.status == 200 else str(data)
            return r.status, r.headers.get(REPLICA_HEADER), text

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            return await asyncio.gather(*(one(s, p) for p in prompts))

    return asyncio.run(go())


def _replica_states(app: str) -> dict[str, int]:
    return dict(serve.status().applications[app].deployments[ENGINE_DEPLOYMENT].replica_states)


def test_a_replica_spanning_two_nodes_answers_like_one_process(cluster, small_llama_folder):
    from ray.util.placement_group import placement_group_table

    want = _reference(small_llama_folder, PROMPTS, 8)
    app = build_app({**ENGINE_KW, "model": str(small_llama_folder), "tensor_parallel_size": 2},
                    num_replicas=1, num_hosts_per_replica=2, health_check_period_s=2.0)
    serve.run(app, name="multihost", route_prefix="/")
    try:
        res = _completions(cluster, PROMPTS, 8)
        assert [status for status, _, _ in res] == [200] * 3, res
        assert [text for _, _, text in res] == want
        # The replica's placement group: one CPU bundle on each of the two nodes.
        pgs = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
        assert len(pgs) == 1 and pgs[0]["strategy"] == "STRICT_SPREAD"
        assert list(pgs[0]["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
        assert len(set(pgs[0]["bundles_to_node_id"].values())) == 2
        assert _replica_states("multihost") == {"RUNNING": 1}
        # Process 0 of a 2-process job whose mesh has both processes' devices.
        stats = serve.get_deployment_handle(ENGINE_DEPLOYMENT, "multihost").stats.remote().result()
        assert (stats["num_processes"], stats["num_devices"]) == (2, 2)
        # The replica's ray.util.metrics carry its engine's figures (8 tokens per completion).
        exported = serve.get_deployment_handle(ENGINE_DEPLOYMENT, "multihost"
                                               ).export_metrics.remote().result()
        assert exported["generation_tokens"] == 3 * 8 == stats["generation_tokens"]
        assert exported["prompt_tokens"] == stats["prompt_tokens"] > 0
        assert exported["num_requests_running"] == 0
    finally:
        serve.delete("multihost")


def test_autoscaling_adds_a_replica_under_concurrent_long_requests(cluster, small_llama_folder):
    import threading

    app = build_app({**ENGINE_KW, "model": str(small_llama_folder)},
                    autoscaling_config={"min_replicas": 1, "initial_replicas": 1,
                                        "max_replicas": 2, "target_ongoing_requests": 1,
                                        "upscale_delay_s": 1, "downscale_delay_s": 600},
                    health_check_period_s=2.0)
    serve.run(app, name="autoscale", route_prefix="/")
    try:
        assert _replica_states("autoscale") == {"RUNNING": 1}
        # 8 clients keep ~8 requests of 80 tokens in flight (4 running, 4 waiting: max_num_seqs
        # is 4) against a target of 1 per replica, until Serve starts the second replica.
        stop, statuses = threading.Event(), []
        prompts = [f"Client {i} asks for a long story about the number {i}" for i in range(8)]

        def load():
            while not stop.is_set():
                statuses.extend(status for status, _, _ in _completions(cluster, prompts, 80))

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        deadline, states = time.time() + 60, {}
        try:
            while time.time() < deadline:
                states = _replica_states("autoscale")
                if sum(states.values()) >= 2:
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            thread.join(timeout=300)
        assert sum(states.values()) == 2, f"no second replica after 60 s of load: {states}"
        assert statuses and set(statuses) == {200}
        deadline = time.time() + 120  # the new replica loads its model
        while time.time() < deadline and _replica_states("autoscale") != {"RUNNING": 2}:
            time.sleep(1.0)
        assert _replica_states("autoscale") == {"RUNNING": 2}
        # Distinct prompts spread by rendezvous hashing: all 12 on one replica has p = 2**-11 once
        # the ingress's router knows both replicas. RUNNING in serve.status() comes before the
        # controller's long-poll reaches the ingress's handle (CI saw all 12 on the old replica
        # right after RUNNING 2), so fresh batches are sent for up to 30 s until both answer.
        deadline, seen, n = time.time() + 30, set(), 0
        while len(seen) < 2 and time.time() < deadline:
            res = _completions(cluster, [f"Item {n}.{i}: a note on {i * 7919 % 1000}"
                                         for i in range(12)], 2)
            assert [s for s, _, _ in res] == [200] * 12
            seen |= {r for _, r, _ in res}
            n += 1
        assert len(seen) == 2, f"12 x {n} distinct requests all went to {seen}"
    finally:
        serve.delete("autoscale")


def test_importing_the_serve_modules_leaves_jax_uninitialized():
    # A multi-host replica calls jax.distributed.initialize in its constructor, after Serve has
    # imported server.ray_serve: that import must not have started a JAX backend.
    import subprocess
    import sys

    code = ("import server.ray_serve, server.ray_multihost, jaxllm\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


class _Recorder:
    """Stands in for ``ray.util.metrics``: keeps what each Gauge/Counter was given."""

    def __init__(self):
        self.made: dict[str, "_Recorder.Metric"] = {}
        rec = self

        class Metric:
            def __init__(self, name, description="", tag_keys=()):
                self.name, self.tag_keys, self.tags, self.calls = name, tag_keys, {}, []
                rec.made[name] = self

            def set_default_tags(self, tags):
                self.tags = dict(tags)

            def set(self, value):
                self.calls.append(("set", value))

            def inc(self, value=1.0):
                assert value > 0  # Ray's Counter refuses anything else
                self.calls.append(("inc", value))

        self.Gauge = self.Counter = Metric


def test_replica_metrics_record_the_engine_stats_and_counters_only_by_their_increase():
    from server.ray_metrics import RayEngineMetrics

    stats = {"num_running": 3, "num_waiting": 1, "kv_cache_usage": 0.25, "prompt_tokens": 40,
             "generation_tokens": 10, "prefix_cache_queries": 40, "prefix_cache_hits": 10,
             "num_preemptions": 0}
    engine = types.SimpleNamespace(get_stats=lambda: dict(stats))
    rec = _Recorder()
    m = RayEngineMetrics(engine, "tiny", "replica-1", metrics=rec)
    assert sorted(rec.made) == sorted(
        f"jaxllm_{n}" for n in ("num_requests_running", "num_requests_waiting",
                                "kv_cache_usage_perc", "prefix_cache_hit_rate", "prompt_tokens",
                                "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
                                "num_preemptions"))
    assert all(x.tags == {"model_name": "tiny", "replica": "replica-1"} for x in rec.made.values())
    out = m.update()
    assert out["num_requests_running"] == 3 and out["prefix_cache_hit_rate"] == 0.25
    assert rec.made["jaxllm_generation_tokens"].calls == [("inc", 10.0)]
    assert rec.made["jaxllm_num_preemptions"].calls == []  # zero: nothing to add
    stats.update(num_running=0, generation_tokens=25, prefix_cache_queries=80,
                 prefix_cache_hits=50)
    out = m.update()
    assert rec.made["jaxllm_generation_tokens"].calls == [("inc", 10.0), ("inc", 15.0)]
    assert rec.made["jaxllm_num_requests_running"].calls == [("set", 3.0), ("set", 0.0)]
    assert out["prefix_cache_hit_rate"] == 50 / 80 and out["generation_tokens"] == 25
    m.update()  # unchanged stats: counters get nothing
    assert len(rec.made["jaxllm_generation_tokens"].calls) == 2
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        m.start(0)
