"""Reasoning outputs (vLLM's ``--reasoning-parser``): a reasoning model's thinking, written
between ``<think>`` and ``</think>``, comes back apart from its answer, in the chat message's
``reasoning`` field (vLLM's current name; it was ``reasoning_content``) and as a ``reasoning``
output item of /v1/responses.

Parsers:
- "deepseek_r1" (DeepSeek-R1 and its Llama / Qwen distills, QwQ): the chat template opens
  ``<think>`` in the prompt, so the reply is thinking up to ``</think>`` (a leading ``<think>``
  is dropped) and the answer after it; a reply with no ``</think>`` is all thinking.
- "qwen3" (Qwen3): thinking up to ``</think>`` when the reply has one (a leading ``<think>``
  dropped); a reply without it is all answer (thinking off: ``chat_template_kwargs=
  {"enable_thinking": false}``). Streamed, a reply is thinking only if it starts with
  ``<think>``.

The answer part then goes through tool-call parsing as any reply does (server/tools.py).
``jaxllm serve --reasoning-parser`` also hands the parser to the engine's structured outputs
(``structured_outputs_config["reasoning_parser"]``, server/cli.py), so a grammar starts after
the think-close token, as in vLLM; ``"enable_in_reasoning": true`` constrains the thinking too.
"""

from __future__ import annotations

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _strip_open(text: str) -> str:
    stripped = text.lstrip()
    return stripped[len(THINK_OPEN):] if stripped.startswith(THINK_OPEN) else text


def split_reasoning(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a finished reply; None for a part it does not have."""
    if THINK_CLOSE in text:
        reasoning, _, answer = _strip_open(text).partition(THINK_CLOSE)
        return reasoning or None, answer.lstrip("\n") or None
    if parser == "deepseek_r1" or text.lstrip().startswith(THINK_OPEN):
        return _strip_open(text) or None, None
    return None, text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningStream:
    """One streamed choice: turns its text, chunk by chunk, into (reasoning, answer) deltas,
    holding back a tail that could still grow into a tag."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.phase = "reasoning" if parser == "deepseek_r1" else "start"
        self.sent = 0  # characters of self.text already handed out

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        self.text += text
        reasoning, answer = "", ""
        while True:
            rest = self.text[self.sent:]
            if self.phase == "start":  # qwen3: thinking only if the reply opens with <think>
                head = rest.lstrip()
                if THINK_OPEN.startswith(head) and not finished and len(head) < len(THINK_OPEN):
                    return reasoning, answer  # not decided yet
                self.phase = "reasoning" if head.startswith(THINK_OPEN) else "answer"
                continue
            if self.phase == "reasoning":
                if self.sent == 0 and rest.lstrip().startswith(THINK_OPEN):
                    self.sent = self.text.index(THINK_OPEN) + len(THINK_OPEN)
                    continue
                if self.sent == 0 and THINK_OPEN.startswith(rest.lstrip()) and rest.strip() \
                        and not finished:
                    return reasoning, answer  # "<thi": maybe the opening tag
                at = rest.find(THINK_CLOSE)
                if at >= 0:
                    reasoning += rest[:at]
                    self.sent += at + len(THINK_CLOSE)
                    self.phase = "after"
                    continue
                keep = 0 if finished else _partial_suffix(rest, THINK_CLOSE)
                reasoning += rest[:len(rest) - keep]
                self.sent += len(rest) - keep
                return reasoning, answer
            if self.phase == "after":  # the newlines after </think> are not the answer's
                stripped = rest.lstrip("\n")
                if not stripped and not finished:
                    return reasoning, answer
                self.sent += len(rest) - len(stripped)
                self.phase = "answer"
                continue
            answer += rest
            self.sent = len(self.text)
            return reasoning, answer
