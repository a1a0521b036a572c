"""jaxllm: LLM inference and serving on JAX/XLA."""

import os as _os

# JAX preallocates 75% of GPU memory by default; the engine sizes its KV cache from what JAX
# holds (gpu_memory_utilization of it), so let JAX hold nearly all of it unless the user said.
_os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from jaxllm.config import EngineConfig, ModelConfig  # noqa: E402
from jaxllm.outputs import (BeamSearchOutput, ClassificationRequestOutput,  # noqa: E402
                            CompletionOutput, EmbeddingRequestOutput, Logprob,
                            PoolingRequestOutput, RequestOutput, ScoringRequestOutput)
from jaxllm.sampling_params import (BeamSearchParams, RequestOutputKind,  # noqa: E402
                                    SamplingParams)


def __getattr__(name):  # the engine imports JAX models; load it on first use
    if name == "LLM":
        from jaxllm.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from jaxllm.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")


__all__ = ["LLM", "AsyncEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestOutputKind", "EngineConfig", "ModelConfig", "BeamSearchParams",
           "BeamSearchOutput", "PoolingRequestOutput", "EmbeddingRequestOutput",
           "ClassificationRequestOutput", "ScoringRequestOutput"]
__version__ = "0.1.0"
