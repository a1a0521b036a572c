"""A replica spanning several hosts: one Ray actor per host runs one ``jax.distributed`` process.

Layout (docs/DESIGN_NOTES.md, "Ray Serve"): the replica's placement group has one bundle per
host, ``{"CPU": 1, "GPU": gpus_per_host}``, strategy STRICT_SPREAD (one bundle per node). The
Serve replica actor is scheduled in bundle 0 and is process 0: the jax.distributed coordinator,
which runs the AsyncEngine and the OpenAI routes. It starts one ``HostWorker`` in each other
bundle; worker i joins as process i and runs the follower side of the SPMD step loop, the entry
point of ``jaxllm serve --distributed`` (the sharding issue). Every process sees the global mesh
over all hosts' GPUs; only process 0 schedules and talks HTTP.

That entry point is not in this tree yet: ``require_distributed_entry_point`` names what is
missing, and ``build_app(num_hosts_per_replica > 1)`` fails with that message before anything
starts.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# What the sharding issue is to provide (module, function): run(coordinator_address,
# num_processes, process_id, engine_args) joins jax.distributed and follows process 0's steps.
ENTRY_POINT = ("sharding.distributed", "run_follower")


def require_distributed_entry_point() -> Any:
    """The follower entry point; raises NotImplementedError saying what is missing."""
    module, name = ENTRY_POINT
    fn = None
    if importlib.util.find_spec(module) is not None:
        fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise NotImplementedError(
            f"num_hosts_per_replica > 1 needs the multi-host engine of the sharding issue "
            f"({module}.{name}, the process behind `jaxllm serve --distributed`), which this "
            "build does not have; use num_hosts_per_replica=1 (one host per replica).")
    return fn


def placement_options(num_hosts: int, gpus_per_host: float) -> dict[str, Any]:
    """Serve deployment options giving each replica one bundle per host."""
    bundle = {"CPU": 1.0, **({"GPU": float(gpus_per_host)} if gpus_per_host else {})}
    return {"placement_group_bundles": [dict(bundle) for _ in range(num_hosts)],
            "placement_group_strategy": "STRICT_SPREAD"}


def start_followers(num_hosts: int, gpus_per_host: float, engine_args: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[Any]]:
    """From inside a replica (process 0): starts a HostWorker in bundles 1..num_hosts-1 and
    returns (the engine keywords for process 0, the workers' run refs)."""
    import socket

    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    run = require_distributed_entry_point()
    pg = ray.util.get_current_placement_group()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    coordinator = f"{ray.util.get_node_ip_address()}:{port}"
    worker = ray.remote(num_cpus=1, num_gpus=gpus_per_host)(run)
    refs = [worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote(
            coordinator, num_hosts, i, engine_args) for i in range(1, num_hosts)]
    leader = {"coordinator_address": coordinator, "num_processes": num_hosts, "process_id": 0}
    return leader, refs
