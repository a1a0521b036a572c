"""A replica spanning several hosts: one Ray process per host runs one ``jax.distributed`` process.

Layout (docs/DESIGN_NOTES.md, "Ray Serve"): the replica's placement group has one bundle per
host holding the replica's own resources (``{"CPU": 1, "GPU": gpus_per_host}``), strategy
STRICT_SPREAD (one bundle per node). Serve schedules the replica actor in bundle 0; it is
process 0: the jax.distributed coordinator, which runs the AsyncEngine and the OpenAI routes.
Before touching JAX it starts one follower task in each other bundle; follower i joins as
process i and runs ``sharding.distributed.run_follower`` (the process behind ``jaxllm serve
--distributed --process-id i``). Every process sees the global mesh over all hosts' devices;
only process 0 schedules and talks HTTP.

Lifetimes: a follower returns when the leader publishes "stop" (its engine exits) and is
cancelled when the replica shuts down; Ray also kills the tasks of a dead owner, so a killed
replica takes its followers with it. A follower that ends while the replica lives means the
replica's collectives can no longer complete: ``check_health`` then fails and Serve replaces
the whole replica (a new placement group, new followers).
"""

from __future__ import annotations

import socket
from typing import Any

from sharding.distributed import run_follower


def placement_options(num_hosts: int, actor_options: dict[str, Any]) -> dict[str, Any]:
    """Serve deployment options giving each replica one bundle per host, each holding the
    replica actor's CPUs/GPUs (and custom resources), so the actor fits in bundle 0."""
    bundle = {"CPU": float(actor_options.get("num_cpus", 1))}
    if actor_options.get("num_gpus"):
        bundle["GPU"] = float(actor_options["num_gpus"])
    bundle.update({k: float(v) for k, v in (actor_options.get("resources") or {}).items()})
    return {"placement_group_bundles": [dict(bundle) for _ in range(num_hosts)],
            "placement_group_strategy": "STRICT_SPREAD"}


def start_followers(num_hosts: int, actor_options: dict[str, Any], engine_args: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[Any]]:
    """From inside a replica (process 0), before it touches JAX: starts ``run_follower`` in
    bundles 1..num_hosts-1 of the replica's placement group and returns (the keywords of
    ``sharding.distributed.initialize`` for process 0, the followers' object refs)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise RuntimeError("a multi-host replica must run in its placement group "
                           "(build_app(num_hosts_per_replica=N) sets one up)")
    with socket.socket() as s:  # a free port on this node for the coordinator service
        s.bind(("", 0))
        port = s.getsockname()[1]
    coordinator = f"{ray.util.get_node_ip_address()}:{port}"
    follower = ray.remote(run_follower)
    resources = dict(num_cpus=actor_options.get("num_cpus", 1),
                     num_gpus=actor_options.get("num_gpus", 0),
                     resources=actor_options.get("resources"), max_retries=0)
    refs = [follower.options(**resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote(
            coordinator, num_hosts, i, engine_args) for i in range(1, num_hosts)]
    leader = {"coordinator_address": coordinator, "num_processes": num_hosts, "process_id": 0}
    return leader, refs


def followers_alive(refs: list[Any]) -> bool:
    """False once any follower has ended (returned or failed)."""
    import ray

    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    return not done
