"""Anthropic's Messages API (``POST /v1/messages``, the anthropic SDK's
``client.messages.create``; ``POST /v1/messages/count_tokens``) over the chat path, as vLLM's
``/v1/messages``.

A request becomes a chat request (``MessagesRequest.to_chat``): ``system`` the system message,
each message's content blocks the chat messages (``text`` blocks the text, an assistant's
``tool_use`` blocks its tool calls, a user's ``tool_result`` blocks tool messages, before its
text), ``tools`` (name, description, input_schema) the function tools, ``tool_choice`` auto /
any / tool / none the chat's auto / required / named / none, ``max_tokens`` the
max_completion_tokens, ``stop_sequences`` the stop strings. The reply comes back as a Message:
a ``thinking`` block (with ``--reasoning-parser``), a ``text`` block, a ``tool_use`` block per
call (its ``input`` the parsed arguments), and ``stop_reason`` end_turn / max_tokens /
stop_sequence (with the string) / tool_use. Streams send Anthropic's events (message_start,
content_block_start / _delta / _stop, message_delta, message_stop); a tool call goes out whole
at the end (one ``input_json_delta``). Errors have Anthropic's shape (``{"type": "error",
"error": {"type", "message"}}``), the 401 of a wrong key included; only a body over the
server's size limit is refused (413) in OpenAI's shape, before any route runs. ``output_config.format`` (a JSON schema) constrains the
reply. ``cache_control`` marks, ``thinking`` and ``output_config.effort`` settings, ``speed``
and the other routing fields of the current SDK are accepted and have no effect (the prefix
cache is automatic); image and document blocks, ``mcp_servers`` and ``container`` are 400s (a
text-only model, no hosted tools). ``temperature`` / ``top_p`` / ``top_k`` (and vLLM's
``seed``) are taken as vLLM's route takes them (SDKs that no longer send them: ``extra_body``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from server import protocol as P

# Anthropic's error types by HTTP status (its SDK raises by status; the body names the type).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
# chat finish_reason -> Anthropic stop_reason (a matched stop string is "stop_sequence").
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


class Message(P._Model):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(P._Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=P.INT32_MAX)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: P.Int32 | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # output_config.format (a JSON schema) constrains the reply, as the chat's json_schema
    # response_format; its effort has no effect
    output_config: dict[str, Any] | None = None
    # accepted, no effect on the tokens (the prefix cache is automatic; one speed here)
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # sampling (vLLM's Messages route takes them; the current SDK sends them as extra_body)
    seed: int | None = Field(default=None, ge=P.INT64_MIN, le=P.INT64_MAX)
    request_id: str | None = None
    priority: P.Int32 | None = None
    guided_whitespace_pattern: str | None = None  # for forced tool calls' JSON

    def unsupported(self) -> tuple[str, str] | None:
        return None

    def to_chat(self) -> dict[str, Any]:
        """The equivalent chat request's body (ValueError: a block or tool it cannot map)."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": _text(self.system, "system")})
        for m in self.messages:
            messages += _chat_messages(m)
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_completion_tokens": self.max_tokens, "stream": False}
        for name in ("temperature", "top_p", "top_k", "seed", "request_id", "priority",
                     "guided_whitespace_pattern"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop_sequences:
            body["stop"] = list(self.stop_sequences)
        fmt = (self.output_config or {}).get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(
                    fmt.get("schema"), dict):
                raise ValueError("output_config.format must be {'type': 'json_schema', "
                                 "'schema': {...}}")
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt["schema"]}}
        if self.tools:
            body["tools"] = [_chat_tool(t) for t in self.tools]
        choice = _chat_tool_choice(self.tool_choice, bool(self.tools))
        if choice is not None:
            body["tool_choice"] = choice
            if self.tool_choice and self.tool_choice.get("disable_parallel_tool_use"):
                body["parallel_tool_calls"] = False
        return body


class CountTokensRequest(P._Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        return None

    def to_chat(self) -> dict[str, Any]:
        req = MessagesRequest(model=self.model, messages=self.messages, max_tokens=1,
                              system=self.system, tools=self.tools, tool_choice=self.tool_choice)
        return req.to_chat()


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """A string, or text blocks joined (other blocks: ValueError)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ValueError(f"{where} blocks of type {block.get('type')!r} are not supported "
                             "here: text only (this server serves a text-only model).")
        parts.append(block["text"])
    return "".join(parts)


def _chat_messages(m: Message) -> list[dict[str, Any]]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts, calls, results = [], [], []
    for block in m.content:
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise ValueError("a text block needs its text as a string")
            texts.append(block["text"])
        elif kind == "tool_use" and m.role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise ValueError("a tool_use block needs its id and name as strings")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and m.role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise ValueError("a tool_result block needs its tool_use_id as a string")
            content = block.get("content")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _text(content or "", "tool_result content")})
        elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
            continue  # earlier thinking is not sent back to the model (as Anthropic's)
        else:
            raise ValueError(f"{m.role} content blocks of type {kind!r} are not supported "
                             "here (text, tool_use, tool_result).")
    if m.role == "assistant":
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            msg["tool_calls"] = calls
        elif msg["content"] is None:
            msg["content"] = ""
        return [msg]
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom") or not isinstance(tool.get("name"), str):
        raise ValueError(f"tools of type {tool.get('type')!r} are not supported; this server "
                         "runs client tools (name, description, input_schema) only.")
    fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: dict[str, Any] | None, has_tools: bool) -> Any:
    if choice is None:
        return "auto" if has_tools else None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValueError(f"tool_choice {choice!r} is not supported; use auto, any, none or "
                     "{'type': 'tool', 'name': ...}.")


def stop_reason(finish_reason: str | None, matched: Any, has_calls: bool
                ) -> tuple[str, str | None]:
    """(Anthropic's stop_reason, the stop_sequence that ended the reply or None)."""
    if has_calls:
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return STOP_REASONS.get(finish_reason or "stop", "end_turn"), None


def tool_use_block(call: Any) -> dict[str, Any]:
    """A chat tool call as a tool_use block (its arguments parsed: the input object)."""
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        args = {}
    return {"type": "tool_use", "id": call.id, "name": call.name,
            "input": args if isinstance(args, dict) else {}}


def message_body(rid: str, model: str, content: list[dict[str, Any]], reason: str | None,
                 sequence: str | None, input_tokens: int, output_tokens: int,
                 cached: int = 0) -> dict[str, Any]:
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}


def event(kind: str, **fields: Any) -> bytes:
    """One server-sent event of a Messages stream."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()
