"""Tool calling for /v1/chat/completions, as vLLM does it.

``tool_choice`` (OpenAI's; with ``tools`` and no choice it is "auto", as in OpenAI and vLLM):

- "none": the tools go to the chat template (a model may read them) and the reply is text.
- {"type": "function", "function": {"name": f}}: the reply is f's arguments, constrained to f's
  ``parameters`` JSON schema by structured outputs; it comes back as one tool call
  (finish_reason "stop", as OpenAI's forced calls).
- "required": the reply is a JSON array of one or more {"name", "parameters"} objects, each a
  listed tool with its own schema (vLLM's schema, with no keys beside those two; at most one
  with parallel_tool_calls=false);
  it comes back as that many tool calls (finish_reason "tool_calls").
- "auto": the model decides, in its own format, which a parser reads back (vLLM's
  ``--enable-auto-tool-choice --tool-call-parser NAME``; without them "auto" is a 400, as in
  vLLM). Parsers (vLLM's names and formats):

  - "hermes": ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Hermes, Qwen 2.5 / 3);
  - "llama3_json": a reply that is one or more ``{"name": ..., "parameters": ...}`` objects,
    optionally after ``<|python_tag|>``, separated by ";" (Llama 3.1 / 3.2);
  - "mistral": ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}``, or (tokenizer
    v11+) ``name{...}`` / ``name[ARGS]{...}`` per call; the marker is a special token, so such
    requests keep special tokens in the text, and call ids are 9 alphanumerics (Mistral's
    templates check that);
  - "pythonic" / "llama4_pythonic": a Python list of calls with literal keyword arguments,
    ``[get_weather(city="Oslo"), get_time()]`` (Llama 3.2 / 4; the latter optionally inside
    ``<|python_start|>...<|python_end|>``);
  - "granite": ``<|tool_call|>`` (or ``<tool_call>``) then a JSON list of ``{"name",
    "arguments"}`` (IBM Granite 3);
  - "qwen3_coder" (also "qwen3_xml"): ``<tool_call><function=NAME><parameter=P>value
    </parameter>...</function></tool_call>``, each value converted by the tool's schema type
    (Qwen3-Coder).

Streaming: a forced call streams its arguments as they come; "required" and "auto" tool calls
go out whole in the choice's last content chunk, once the text is complete (auto streams the
text before a tool call as content).
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from jaxllm.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "llama4_pythonic",
                     "granite", "qwen3_coder", "qwen3_xml")


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def mistral_tool_call_id() -> str:
    """Mistral's chat templates accept only 9 alphanumeric characters."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


class ToolError(ValueError):
    """A request whose tools cannot run: (param, message) for a 400."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=tool_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


@dataclass
class ToolPlan:
    """What a chat request's tools ask of the engine and of the reply."""

    mode: str  # "none" | "named" | "required" | "auto"
    tools: list[dict[str, Any]]  # the request's tools, for the chat template
    name: str | None = None  # the forced function ("named")
    parser: str | None = None  # "auto": the tool-call parser
    parallel: bool = True

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools or None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The constraint that makes the model call the tool(s), or None."""
        if self.mode == "named":
            fn = self._function(self.name)
            return StructuredOutputsParams(json=fn.get("parameters") or {"type": "object"})
        if self.mode == "required":
            items = [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                     "parameters": t["function"].get("parameters")
                                     or {"type": "object"}},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for t in self.tools]
            schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                      "items": {"type": "object", "anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def _function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    @property
    def streams_arguments(self) -> bool:
        """Whether a stream sends the call's arguments as they come (a forced call)."""
        return self.mode == "named"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished reply. A reply the constraint cut short
        (max_tokens) and so is no valid JSON comes back as content, with no calls."""
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return None, [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                              for c in calls]
            except (ValueError, TypeError, KeyError):
                return text, []
        if self.mode == "auto":
            parser = PARSERS[self.parser]
            content, calls = parser.parse(text, self.tools)
            if parser.make_id is not None:
                for c in calls:
                    c.id = parser.make_id()
            return content, calls
        return text, []

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the reply's text must keep special tokens (the parser's marker is one)."""
        return self.mode == "auto" and PARSERS[self.parser].keep_special_tokens

    def content_prefix(self, text: str) -> str:
        """"auto" streaming: the part of the text so far that is surely content (no tool call
        starts in it), so it can go out before the reply ends."""
        if self.mode != "auto":
            return text
        markers = PARSERS[self.parser].markers
        if PARSERS[self.parser].anywhere:  # a call may follow content: stream up to its marker
            ats = [text.find(m) for m in markers if m in text]
            if ats:
                return text[:min(ats)]
            # hold back a tail that could still grow into a marker
            for k in range(min(max(map(len, markers)) - 1, len(text)), 0, -1):
                if any(m.startswith(text[-k:]) for m in markers):
                    return text[:-k]
            return text
        # a reply that starts as a call is one; anything else is content
        stripped = text.lstrip()
        if not stripped or any(stripped.startswith(m) or m.startswith(stripped)
                               for m in markers):
            return ""
        return text


def plan(tools: list[dict[str, Any]] | None, tool_choice: Any, *, parallel: bool | None,
         enable_auto: bool, parser: str | None) -> ToolPlan | None:
    """The request's ToolPlan (None: no tools and no choice). ToolError for a request vLLM
    refuses: a choice without tools, an unknown function, "auto" without a parser."""
    tools = [t if isinstance(t, dict) else t.model_dump(exclude_none=True) for t in tools or []]
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if not tools and tool_choice == "none":
        return None
    parallel = parallel is not False
    if isinstance(tool_choice, str):
        if tool_choice == "none":
            return ToolPlan("none", tools)
        if not tools:
            raise ToolError("tool_choice", f"tool_choice {tool_choice!r} needs tools.")
        if tool_choice == "required":
            return ToolPlan("required", tools, parallel=parallel)
        if tool_choice == "auto":
            if not enable_auto or parser is None:
                raise ToolError("tool_choice", '"auto" tool choice requires '
                                "--enable-auto-tool-choice and --tool-call-parser to be set.")
            return ToolPlan("auto", tools, parser=parser, parallel=parallel)
        raise ToolError("tool_choice", f"tool_choice must be 'none', 'auto', 'required' or a "
                        f"named function, got {tool_choice!r}.")
    if not isinstance(tool_choice, dict):
        tool_choice = tool_choice.model_dump()
    name = tool_choice["function"]["name"]
    if not tools:
        raise ToolError("tool_choice", "A named tool_choice needs tools.")
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolError("tool_choice", f"Tool {name!r} has not been passed in `tools`.")
    return ToolPlan("named", tools, name=name, parallel=parallel)


# -- parsers of "auto" replies ---------------------------------------------------------------------
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call(obj: Any, args_key: str) -> ToolCall:
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str)
                    else json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    at = text.find(HERMES_OPEN)
    if at < 0:
        return text, []
    try:
        calls = [_call(json.loads(m), "arguments") for m in _HERMES_CALL.findall(text[at:])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    content = text[:at].strip()
    return content or None, calls


def parse_llama3_json(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    try:
        while pos < len(body):
            obj, end = decoder.raw_decode(body, pos)
            calls.append(_call(obj, "parameters"))
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return None, calls


MISTRAL_TOOL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def parse_mistral(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    at = text.find(MISTRAL_TOOL_CALLS)
    if at < 0:
        return text, []
    content = text[:at].strip() or None
    decoder, calls = json.JSONDecoder(), []
    try:
        for part in text[at:].split(MISTRAL_TOOL_CALLS)[1:]:
            part = part.strip()
            if part.startswith("["):  # a JSON list of {"name", "arguments"}
                objs, end = decoder.raw_decode(part)
                calls += [_call(o, "arguments") for o in objs]
                continue
            # tokenizer v11+: name[ARGS]{...} (or name{...}); several calls each after a marker
            name, sep, rest = part.partition(MISTRAL_ARGS)
            if not sep:
                brace = part.index("{")
                name, rest = part[:brace], part[brace:]
            args, _ = decoder.raw_decode(rest.strip())
            if not name.strip() or not isinstance(args, dict):
                raise ValueError("not a call")
            calls.append(ToolCall(name.strip(), json.dumps(args, ensure_ascii=False)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return content, calls


PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def _literal(node: ast.AST) -> Any:
    """A keyword argument's value: a Python literal, or JSON's true / false / null."""
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    return ast.literal_eval(node)


def parse_pythonic(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(PYTHON_START):
        body = body[len(PYTHON_START):]
        if body.rstrip().endswith(PYTHON_END):
            body = body.rstrip()[:-len(PYTHON_END)]
        body = body.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return text, []
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List):
            raise ValueError("not a list")
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) \
                    or node.args:
                raise ValueError("not a call with keyword arguments")
            args = {kw.arg: _literal(kw.value) for kw in node.keywords}
            calls.append(ToolCall(node.func.id, json.dumps(args, ensure_ascii=False)))
    except (ValueError, SyntaxError, TypeError, AttributeError):
        return text, []
    return None, calls


GRANITE_MARKERS = ("<|tool_call|>", "<tool_call>")


def parse_granite(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    for m in GRANITE_MARKERS:
        if body.startswith(m):
            body = body[len(m):].strip()
            break
    if not body.startswith("["):
        return text, []
    try:
        objs, _ = json.JSONDecoder().raw_decode(body)
        calls = [_call(o, "arguments") for o in objs]
    except (ValueError, TypeError, KeyError, AttributeError):
        return text, []
    return None, calls


_QWEN3_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*"
                         r"(?:</tool_call>|$)", re.DOTALL)
_QWEN3_PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    """A qwen3_coder parameter's text as its schema's type (vLLM's conversion): strings stay
    text, numbers / booleans / null are parsed, objects and arrays read as JSON (or Python)."""
    kind = (schema or {}).get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if value.lower() == "null":
        return None
    if "string" in kinds:
        return value
    try:
        if "integer" in kinds:
            return int(value)
        if "number" in kinds:
            f = float(value)
            return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() \
                else f
        if "boolean" in kinds:
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(value)
        return json.loads(value)
    except ValueError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value


def parse_qwen3_coder(text: str, tools: Any = None) -> tuple[str | None, list[ToolCall]]:
    at = text.find(HERMES_OPEN)
    if at < 0:
        return text, []
    params = {t["function"]["name"]: (t["function"].get("parameters") or {}).get(
        "properties", {}) for t in tools or []}
    calls = []
    for name, body in _QWEN3_CALL.findall(text[at:]):
        name = name.strip()
        props = params.get(name, {})
        args = {}
        for key, raw in _QWEN3_PARAM.findall(body):
            key = key.strip()
            v = raw[1:] if raw.startswith("\n") else raw
            v = v[:-1] if v.endswith("\n") else v
            args[key] = _typed(v, props.get(key))
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    if not calls:
        return text, []
    return text[:at].strip() or None, calls


@dataclass(frozen=True)
class Parser:
    """An "auto" reply format: ``parse(text, tools)`` -> (content, calls); ``markers``: what
    opens a call; ``anywhere``: a call may follow content (else a reply that starts with a
    marker is a call and any other is content); ``keep_special_tokens``: the marker is a
    special token, so the reply keeps them; ``make_id``: the call ids the model expects."""

    parse: Callable[[str, Any], tuple[str | None, list[ToolCall]]]
    markers: tuple[str, ...]
    anywhere: bool
    keep_special_tokens: bool = False
    make_id: Callable[[], str] | None = None


PARSERS = {
    "hermes": Parser(parse_hermes, (HERMES_OPEN,), anywhere=True),
    "llama3_json": Parser(parse_llama3_json, ("{", PYTHON_TAG), anywhere=False),
    "mistral": Parser(parse_mistral, (MISTRAL_TOOL_CALLS,), anywhere=True,
                      keep_special_tokens=True, make_id=mistral_tool_call_id),
    "pythonic": Parser(parse_pythonic, ("[",), anywhere=False),
    "llama4_pythonic": Parser(parse_pythonic, ("[", PYTHON_START), anywhere=False),
    "granite": Parser(parse_granite, ("[",) + GRANITE_MARKERS, anywhere=False),
    "qwen3_coder": Parser(parse_qwen3_coder, (HERMES_OPEN,), anywhere=True),
    "qwen3_xml": Parser(parse_qwen3_coder, (HERMES_OPEN,), anywhere=True),
}
assert set(PARSERS) == set(TOOL_CALL_PARSERS)


def template_message_tool_calls(tool_calls: list[Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them: arguments as a dict
    (templates write ``tool_call.arguments | tojson``), as vLLM passes them."""
    out = []
    for tc in tool_calls:
        tc = tc if isinstance(tc, dict) else tc.model_dump(exclude_none=True)
        fn = dict(tc.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args)
            except ValueError:
                pass  # not JSON: the template gets the text
        out.append({**tc, "function": fn})
    return out


class ToolStream:
    """One streamed choice of a request with tools: turns its text, chunk by chunk, into the
    deltas to send, (content, tool-call deltas as OpenAI dicts) (module docstring,
    Streaming)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of content already sent ("auto")
        self.call_id: str | None = None  # the forced call's id, once its header went out

    def feed(self, text: str, finished: bool) -> tuple[str | None, list[dict[str, Any]]]:
        self.text += text
        mode = self.plan.mode
        if mode == "none":
            return text, []
        if mode == "named":
            deltas: list[dict[str, Any]] = []
            if self.call_id is None:
                self.call_id = tool_call_id()
                deltas.append({"index": 0, "id": self.call_id, "type": "function",
                               "function": {"name": self.plan.name, "arguments": ""}})
            if text:
                deltas.append({"index": 0, "function": {"arguments": text}})
            return None, deltas
        if not finished:
            prefix = self.plan.content_prefix(self.text) if mode == "auto" else ""
            out, self.sent = prefix[self.sent:], max(self.sent, len(prefix))
            return out or None, []
        _, calls = self.plan.extract(self.text)
        if not calls:  # no call after all (or cut short): the rest is content
            out, self.sent = self.text[self.sent:], len(self.text)
            return out or None, []
        prefix = self.plan.content_prefix(self.text) if mode == "auto" else ""
        out, self.sent = prefix[self.sent:], len(self.text)
        return out or None, [c.to_openai(i) for i, c in enumerate(calls)]
