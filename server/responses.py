"""OpenAI's Responses API (``POST /v1/responses``, the SDK's ``client.responses.create``) over the
chat path.

A request becomes a chat request (``ResponsesRequest.to_chat``): ``instructions`` the system
message, ``input`` (a string, or a list of messages, ``function_call`` and
``function_call_output`` items) the messages, ``text.format`` the response_format, function
``tools`` / ``tool_choice`` the chat ones (server/tools.py), ``max_output_tokens`` the
max_completion_tokens, ``top_logprobs`` / ``include: ["message.output_text.logprobs"]`` the
chat's logprobs (the output text part's ``logprobs``; in a stream, on its ``done`` events).
The reply comes back as Response output items: a ``reasoning`` item (with
``--reasoning-parser``, server/reasoning.py), a ``message`` with one ``output_text`` part,
and a ``function_call`` item per tool call. ``status`` is "incomplete"
(``incomplete_details.reason`` "max_output_tokens") when max_output_tokens cut the reply.

Streams send OpenAI's events (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
..., ``response.completed``), each with its ``sequence_number``; function calls go out whole
when the reply ends (``response.function_call_arguments.delta`` once, then ``.done``).

Stored responses (vLLM's ``VLLM_ENABLE_RESPONSES_API_STORE=1``, or ``JAXLLM_...``; off by
default, as in vLLM, where ``store`` is then ignored): a response with ``store`` (OpenAI's
default true) is kept in memory with its conversation (``ResponseStore``), so ``GET`` /
``DELETE /v1/responses/{id}`` find it and a later request's ``previous_response_id`` continues
it (its messages, then the new input; the previous ``instructions`` are not carried over, as
OpenAI says). vLLM's store never forgets; this one keeps the latest ``STORE_CAPACITY``.
Without the store, ``previous_response_id`` is a 404 (nothing is found), as in vLLM.
With the store, ``background: true`` (vLLM's and OpenAI's background mode) answers at once
with the response ``in_progress`` and generates detached from the connection; ``GET`` shows its
status until it is ``completed`` / ``incomplete`` (or ``failed``, with its ``error``), and
``POST /v1/responses/{id}/cancel`` stops it (``cancelled``). Not with ``stream``.
Not kept: ``conversation`` is a 400, as are tools other than functions (web search, file
search ...), and image / file inputs.
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from typing import Any, Literal

from pydantic import ConfigDict, Field

from server import protocol as P
from server import tools as tool_lib


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# OpenAI's include entry that asks for the output text's log-probs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class TextFormat(P._Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(P._Model):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted, no effect


class FunctionTool(P._Model):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(P._Model):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=P.INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # accepted, no effect on the tokens (as in the chat route); store: kept when the server
    # stores responses (None: OpenAI's default, true)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None  # a stored response (ResponseStore) to continue
    background: bool | None = None  # with the store only (the route checks)
    # refused unless neutral (no conversations)
    conversation: str | dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's sampling extras
    top_k: P.Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=P.INT64_MIN, le=P.INT64_MAX)
    request_id: str | None = None
    guided_whitespace_pattern: str | None = None  # for text.format and forced tool calls
    priority: P.Int32 | None = None  # vLLM's, for --scheduling-policy priority
    cache_salt: str | None = None  # vLLM's prefix-cache salt

    def unsupported(self) -> tuple[str, str] | None:
        if self.conversation is not None:
            return "conversation", "conversation is not supported: this server stores nothing."
        return None

    @property
    def wants_logprobs(self) -> bool:
        """The output text's log-probs were asked for (OpenAI's ``include`` entry, or a
        ``top_logprobs`` width)."""
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or ())

    def to_chat(self, previous: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """The equivalent chat request's body (ValueError: an input or tool it cannot map),
        after the ``previous`` conversation's messages (``previous_response_id``; its system
        message dropped: instructions are not carried over)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        messages += [m for m in previous if m.get("role") != "system"]
        messages += _messages(self.input)
        body: dict[str, Any] = {"messages": messages, "stream": False}
        for name in ("model", "temperature", "top_p", "parallel_tool_calls", "top_k", "min_p",
                     "repetition_penalty", "seed", "request_id", "guided_whitespace_pattern",
                     "priority", "cache_salt"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.wants_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.json_schema,
                "strict": fmt.strict}}
        if self.tools:
            tools = []
            for t in self.tools:
                if t.get("type") != "function":
                    raise ValueError(f"tools of type {t.get('type')!r} are not supported; this "
                                     "server runs function tools only.")
                f = FunctionTool.model_validate(t)
                tools.append({"type": "function", "function": f.model_dump(
                    exclude={"type"}, exclude_none=True)})
            body["tools"] = tools
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or "name" not in choice:
                raise ValueError(f"tool_choice {choice!r} is not supported; use 'none', "
                                 "'auto', 'required' or {'type': 'function', 'name': ...}.")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        if choice is not None:
            body["tool_choice"] = choice
        return body


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"input content must be a string or a list of parts, got {content!r}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise ValueError(f"input content of type {kind!r} is not supported: this server "
                             "serves a text-only model.")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"an {kind} part needs its text as a string")
        parts.append(part["text"])
    return "".join(parts)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output") and not isinstance(
                item.get("call_id"), str):
            raise ValueError(f"a {kind} item needs its call_id as a string")
        if kind == "message":
            out.append({"role": item["role"], "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text(output)})
        else:
            raise ValueError(f"input items of type {kind!r} are not supported.")
    return out


STORE_ENVS = ("VLLM_ENABLE_RESPONSES_API_STORE", "JAXLLM_ENABLE_RESPONSES_API_STORE")
STORE_CAPACITY = 10_000  # responses kept; the oldest beyond it are forgotten


def store_enabled() -> bool:
    """vLLM's reading of its variable: "1" or "true" (any case) turns the store on."""
    return any(os.environ.get(name, "0").strip().lower() in ("1", "true")
               for name in STORE_ENVS)


class ResponseStore:
    """Stored responses by id: the Response body and its conversation as chat messages (the
    request's, then the reply's assistant turn), the latest ``capacity`` of them."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]]
        self._items = collections.OrderedDict()

    def put(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._items[body["id"]] = (body, messages)
        self._items.move_to_end(body["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        return self._items.get(rid)

    def pop(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


class ResponseState:
    """The Response object of one request, built as its reply arrives. ``stored``: the body
    says ``store: true`` (the server keeps it once done)."""

    def __init__(self, req: ResponsesRequest, model: str, rid: str, stored: bool = False):
        self.req, self.model, self.id = req, model, rid
        self.stored = stored
        self.messages: list[dict[str, Any]] | None = None  # the chat messages sent (if stored)
        self.error: dict[str, str] | None = None  # a failed background response's
        self.logprobs: list[dict[str, Any]] = []  # the output text's (when asked for)
        self.k: int | None = None  # their top-k width (None: not asked for)
        self.created_at = int(time.time())
        self.msg_id = _id("msg")
        self.reasoning_id = _id("rs")
        self.reasoning: str | None = None  # --reasoning-parser: the reply's thinking
        self.text = ""
        self.calls: list[tool_lib.ToolCall] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def message_item(self, status: str, text: str | None = None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text,
                                            "annotations": [], "logprobs": self.logprobs}]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": content}

    def reasoning_item(self, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": self.reasoning or ""}]}

    @staticmethod
    def call_item(call: tool_lib.ToolCall, status: str, arguments: str | None = None
                  ) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call.id.rsplit('-', 1)[-1]}",
                "call_id": call.id, "name": call.name,
                "arguments": call.arguments if arguments is None else arguments,
                "status": status}

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def output(self) -> list[dict[str, Any]]:
        items = [self.reasoning_item("completed")] if self.reasoning else []
        if self.text or not (self.calls or self.reasoning):
            items.append(self.message_item(self.status, self.text))
        items += [self.call_item(c, "completed") for c in self.calls]
        return items

    def body(self, status: str | None = None) -> dict[str, Any]:
        req = self.req
        status = status or self.status
        done = status in ("completed", "incomplete")
        fmt = (req.text.format.model_dump(by_alias=True, exclude_none=True)
               if req.text is not None and req.text.format is not None else {"type": "text"})
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "error": self.error,
            "background": bool(req.background),
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if status == "incomplete" else None),
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "output": self.output() if done else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature, "top_p": req.top_p,
            "tool_choice": req.tool_choice if req.tool_choice is not None else (
                "auto" if req.tools else "none"),
            "tools": req.tools or [], "text": {"format": fmt}, "truncation": "disabled",
            "store": self.stored, "previous_response_id": req.previous_response_id,
            "usage": self.usage if done else None,
        }

    def assistant_message(self) -> dict[str, Any]:
        """The reply as the chat message a continuation sends back (its text and calls)."""
        msg: dict[str, Any] = {"role": "assistant",
                               "content": self.text or (None if self.calls else "")}
        if self.calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in self.calls]
        return msg

    def set_usage(self, prompt_tokens: int, output_tokens: int, cached: int) -> None:
        self.usage = {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + output_tokens}


class ResponseObject(P._Response):
    """The Response object's main fields (for the OpenAPI document; ResponseState.body has
    them all)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class EventWriter:
    """Server-sent events of a Response stream, numbered in order."""

    def __init__(self):
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
