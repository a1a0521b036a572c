"""One process of tests/test_sharding.py's two-process jax.distributed test (not a test module).

    python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT ENGINE_KW_JSON PROMPTS_JSON

Process 0 leads (an LLM generating greedily, printing ``TOKENS <json>``); the others run
``sharding.distributed.run_follower`` with the same engine arguments.
"""

import json
import sys


def main() -> int:
    pid, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kw, prompts = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    from sharding import distributed

    addr = f"127.0.0.1:{port}"
    if pid > 0:
        steps = distributed.run_follower(addr, n, pid, kw)
        print(f"FOLLOWED {steps}", flush=True)
        return 0
    distributed.initialize(addr, n, 0)
    from jaxllm import LLM, SamplingParams

    llm = LLM(**kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
