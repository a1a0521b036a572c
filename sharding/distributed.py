"""Multi-host start-up: every host runs one ``jax.distributed`` process; process 0 leads.

JAX on several hosts is multi-controller SPMD: every process must launch the same jitted
programs, in the same order, over the global mesh (``jax.devices()`` lists every host's
devices). So:
  - the leader (process 0) runs the scheduler, the server and the engine as usual; each step it
    has prepared (numpy StepInputs + the sampler's static choices) is published on the
    coordinator's key-value store before being launched;
  - a follower builds the same engine (same config: same params in its devices' shards, same
    buckets compiled in the same order), then loops: read step n, launch it, never read results.
The leader reads the sampled tokens from its own replica of the (replicated) sampler output, so
followers never send anything back; the collectives inside each step keep all processes in
lock step (the leader can run at most the async-dispatch depth ahead).

The channel is the coordination service's key-value store (``jax.distributed``'s own): simple
and dependency-free, one small RPC per step. A higher-throughput transport (a broadcast of the
inputs as a device collective) is the next step if it shows in step time.

Pipeline parallelism across hosts is not supported (one program per stage would need
cross-host device transfers): multi-host runs tensor parallelism over all hosts' devices,
or data parallel replicas.

Two nodes (each with its GPUs; the coordinator is node 0's address, any free port)::

    node0$ jaxllm serve /models/llama --distributed --coordinator-address 10.0.0.1:8476 \\
               --num-processes 2 --process-id 0 -tp 16
    node1$ jaxllm serve /models/llama --distributed --coordinator-address 10.0.0.1:8476 \\
               --num-processes 2 --process-id 1 -tp 16

(or JAXLLM_COORDINATOR_ADDRESS / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID in the environment).
Only node 0 serves HTTP; node 1 follows until node 0 exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import zlib
from typing import Any

import jax

logger = logging.getLogger("jaxllm")

_PREFIX = "jaxllm/step/"
_KEEP = 256  # published steps kept on the coordinator (followers are at most a few behind)
_POLL_MS = 60_000


def resolve_args(coordinator_address: str | None, num_processes: int | None,
                 process_id: int | None) -> tuple[str, int, int]:
    """Flags, else JAXLLM_COORDINATOR_ADDRESS / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID."""
    addr = coordinator_address or os.environ.get("JAXLLM_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else os.environ.get("JAXLLM_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAXLLM_PROCESS_ID")
    missing = [name for name, v in (("--coordinator-address", addr), ("--num-processes", n),
                                    ("--process-id", pid)) if v is None]
    if missing:
        raise ValueError(
            f"--distributed needs {', '.join(missing)} (or the JAXLLM_COORDINATOR_ADDRESS / "
            "JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID environment variables).")
    n, pid = int(n), int(pid)
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"process_id must be in [0, num_processes); got process_id={pid}, "
                         f"num_processes={n}.")
    return addr, n, pid


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize (CPU: with gloo collectives, so CPU tests can run it)."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", process_id,
                num_processes, jax.local_device_count(), jax.device_count())


def is_multi_process() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def agree(name: str, value: Any) -> Any:
    """The leader's ``value`` on every process (e.g. the KV page count sized from memory)."""
    if not is_multi_process():
        return value
    key = f"jaxllm/agree/{name}"
    if is_leader():
        _client().key_value_set_bytes(key, pickle.dumps(value))
        return value
    return pickle.loads(_client().blocking_key_value_get_bytes(key, 10 * _POLL_MS))


class StepChannel:
    """Leader -> followers: the n-th message under ``jaxllm/step/n`` (pickled, zlib level 1:
    page tables are mostly padding).

    ``background=True`` (the leader): ``publish`` only queues; one thread pickles and sends in
    order, so the leader's step loop never waits for the coordinator's RPC (~1-2 ms here). The
    followers' lag is hidden behind async scheduling: the leader dispatches step N+1 while step
    N runs, and step N+1's collectives only need the followers by the time N+1 executes.
    """

    def __init__(self, background: bool = False):
        self._n = 0
        self._queue = None
        self._error: BaseException | None = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="jaxllm-step-publisher",
                                            daemon=True)
            self._thread.start()

    def _send(self, msg: Any) -> None:
        c = _client()
        c.key_value_set_bytes(f"{_PREFIX}{self._n}",
                              zlib.compress(pickle.dumps(msg, protocol=5), 1))
        if self._n >= _KEEP:
            try:
                c.key_value_delete(f"{_PREFIX}{self._n - _KEEP}")
            except Exception:  # pragma: no cover - best effort
                pass
        self._n += 1

    def _drain(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                self._send(msg)
            except BaseException as e:  # surfaces on the leader's next publish
                self._error = e
                logger.error("publishing step %d to the followers failed: %r", self._n, e)
                return

    def publish(self, msg: Any) -> None:
        if self._error is not None:
            raise RuntimeError("the followers can no longer be reached") from self._error
        if self._queue is None:
            self._send(msg)
        else:
            self._queue.put(msg)

    def close(self) -> None:
        """Sends what is queued, then stops the publishing thread."""
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)

    def receive(self) -> Any:
        c = _client()
        while True:
            try:
                raw = c.blocking_key_value_get_bytes(f"{_PREFIX}{self._n}", _POLL_MS)
                break
            except Exception as e:  # idle leader: keep waiting
                if "DEADLINE" not in str(e).upper() and "TIMEOUT" not in str(e).upper():
                    raise
        self._n += 1
        return pickle.loads(zlib.decompress(raw))


def attach_leader(runner) -> StepChannel:
    """Makes the leader's runner publish every step it launches; followers stop at exit."""
    import atexit

    channel = StepChannel(background=True)
    runner.publisher = channel.publish

    def stop() -> None:
        channel.publish(("stop",))
        channel.close()
    atexit.register(stop)
    return channel


def follow(runner, channel: StepChannel | None = None) -> int:
    """The follower loop: launch what the leader launches, until it stops. Returns the number
    of steps followed."""
    channel = channel or StepChannel()
    n = 0
    while True:
        msg = channel.receive()
        if msg[0] == "stop":
            return n
        _, inputs, num_logprobs, sort, next_ids = msg
        runner.launch(inputs, num_logprobs, sort, next_ids)
        n += 1


def run_follower(coordinator_address: str, num_processes: int, process_id: int,
                 engine_args: dict[str, Any]) -> int:
    """A follower process: join jax.distributed, build the same engine as the leader (from
    ``engine_args``, EngineConfig's keywords), then follow its steps until it stops.

    This is the process behind ``jaxllm serve --distributed --process-id N`` (N > 0) and what
    server/ray_multihost.py starts on every host but the first. Returns the steps followed.
    """
    if process_id == 0:
        raise ValueError("process 0 is the leader: it runs the server, not run_follower.")
    initialize(coordinator_address, num_processes, process_id)
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(**engine_args))
    n = follow(engine.runner)
    logger.info("follower %d: leader stopped after %d steps", process_id, n)
    return n
