"""The (dp, pp, tp) device mesh, and the sub-meshes each engine program runs on.

Axes: ``dp`` independent engine replicas, ``pp`` pipeline stages of one replica, ``tp`` tensor
parallel shards of one stage. Devices are laid out row-major (dp outermost, tp innermost), so a
stage's tp shards are neighbouring device ids (NVLink peers on one host). Under
``jax.distributed`` ``jax.devices()`` lists every host's devices, so the same mesh spans hosts.

Every compiled program sees a 1-D ``("tp",)`` mesh: a replica without pipelining runs on its
stage 0 mesh, and with pipelining each stage is its own program on its own ``tp`` mesh (see
sharding/pipeline.py for why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "pp", "tp")
TP = "tp"


def make_mesh(dp: int = 1, pp: int = 1, tp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dp, pp, tp)`` mesh over ``devices`` (default: all devices, every host's).

    Uses the first dp * pp * tp devices; raises ValueError naming the sizes when there are not
    enough devices.
    """
    for name, v in (("data_parallel_size", dp), ("pipeline_parallel_size", pp),
                    ("tensor_parallel_size", tp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    devices = list(jax.devices() if devices is None else devices)
    need = dp * pp * tp
    if need > len(devices):
        raise ValueError(
            f"data_parallel_size ({dp}) x pipeline_parallel_size ({pp}) x tensor_parallel_size "
            f"({tp}) = {need} devices, but only {len(devices)} are available "
            f"({devices[0].platform}). Lower the parallel sizes so their product is at most "
            f"{len(devices)}.")
    return Mesh(np.asarray(devices[:need], dtype=object).reshape(dp, pp, tp), AXES)


@dataclass(frozen=True)
class ReplicaMesh:
    """One engine replica's devices: ``devices[pp, tp]``; ``stage(s)`` is stage s's tp mesh."""

    devices: np.ndarray  # [pp, tp] of jax.Device

    @property
    def pp(self) -> int:
        return self.devices.shape[0]

    @property
    def tp(self) -> int:
        return self.devices.shape[1]

    def stage(self, s: int) -> Mesh:
        return Mesh(self.devices[s], (TP,))

    @property
    def all_devices(self) -> list[jax.Device]:
        return list(self.devices.reshape(-1))

    def for_config(self, config):
        """The replica's ``sharding.rules.ModelSharding`` for a model (validates tp vs heads)."""
        from sharding.rules import ModelSharding

        return ModelSharding.build(self, config)


def replica_meshes(mesh: Mesh) -> list[ReplicaMesh]:
    """The dp replicas of a ``(dp, pp, tp)`` mesh, each on its own disjoint devices."""
    return [ReplicaMesh(mesh.devices[i]) for i in range(mesh.devices.shape[0])]


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges for pp stages, as even as possible (earlier stages get the extra
    layer: the last stage also runs the final norm and the lm_head)."""
    if pp > num_layers:
        raise ValueError(
            f"pipeline_parallel_size ({pp}) exceeds the model's {num_layers} layers: every stage "
            "needs at least one layer.")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out

