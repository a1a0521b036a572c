"""Request and response models of the OpenAI-compatible API (pydantic v2), in OpenAI's shapes.

Unknown fields: vLLM accepts any extra field and only logs that it was ignored. We are stricter,
because a silently ignored field that changes semantics (``tools``, ``response_format``,
``suffix`` ...) returns an answer the client did not ask for. So:

- every model is ``extra="forbid"``: a misspelt or unknown field is a 400 naming it;
- OpenAI fields that cannot change the tokens we produce (``user``, ``metadata``, ``store``,
  ``service_tier``, ``parallel_tool_calls``, ``prediction``, ``reasoning_effort``, ...) are
  declared and ignored, so the official SDKs and LangChain work unchanged;
- OpenAI fields we do not implement are declared too, and a request that sets them to anything
  but their neutral value gets a 400 that says so (``suffix``, ``best_of`` != n, image/audio
  content parts ...), see ``unsupported()``.

Structured outputs come from ``response_format`` (json_object, json_schema, structural_tag) or
vLLM's extras (``structured_outputs``, and the older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``); ``structured_outputs_params()`` turns the one a request
uses into jaxllm's StructuredOutputsParams and refuses two at once.

Ranges that SamplingParams checks (temperature, top_p, penalties ...) are checked there, once;
here we bound only what must fit the engine's int32/int64 arrays, so no input reaches the device
loop out of range.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator,
                      model_serializer)

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Int32 = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class _WithExtras(_Response):
    """A response part with vLLM's optional extras (``_EXTRAS``), left out of the JSON while
    None, so a reply has them only when the request asked (return_token_ids, prompt_logprobs)."""

    _EXTRAS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unset_extras(self, handler):
        out = handler(self)
        for name in self._EXTRAS:
            if name in out and out[name] is None:
                del out[name]
        return out


# -- errors ---------------------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# -- shared pieces --------------------------------------------------------------------------------
class JsonSchemaFormat(_Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # vLLM's structural tag: tagged JSON values in free text
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _SamplingFields(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None  # None: the (first) served model
    n: Annotated[int, Field(ge=1, le=128)] = 1  # OpenAI's bound; also bounds the work per request
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored (OpenAI uses it for abuse monitoring)
    # vLLM's extras
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: Int32 | None = None  # the prompt's last k tokens (-1: the context)
    request_id: str | None = None  # vLLM extra: used in the response id when given
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[StrictStr] | None = None
    priority: Int32 = 0  # vLLM's: with --scheduling-policy priority, lower is served first
    prompt_logprobs: Int32 | None = None  # vLLM's: the prompt tokens' log-probs (no stream)
    return_token_ids: bool | None = None  # vLLM's: prompt and output token ids in the reply
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:{id}"
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share cached pages
    # vLLM's beam search: n beams, ranked by cum log-prob / length ** length_penalty
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured outputs (structured_outputs_params)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # one backend here: "guidance" (or "auto")

    def structured_outputs_field(self) -> str | None:
        """The field this request's structured outputs come from (for an error's param)."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return next((name for name in ("structured_outputs", "guided_json", "guided_regex",
                                       "guided_choice", "guided_grammar")
                     if getattr(self, name) is not None), None)

    def structured_outputs_params(self) -> tuple[str, Any] | None:
        """(the field it came from, StructuredOutputsParams) or None. ValueError for two
        sources at once, or one that is not a valid constraint."""
        from jaxllm.sampling_params import StructuredOutputsParams

        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise ValueError(f"guided_decoding_backend {self.guided_decoding_backend!r} is not "
                             "available: this server's structured outputs backend is "
                             "'guidance' (llguidance).")
        rf = self.response_format
        sources: dict[str, dict[str, Any]] = {}
        if rf is not None and rf.type == "json_object":
            sources["response_format"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ValueError("response_format of type 'json_schema' needs "
                                 "json_schema.schema.")
            sources["response_format"] = {"json": rf.json_schema.json_schema}
        elif rf is not None and rf.type == "structural_tag":
            if not rf.structures or rf.triggers is None:
                raise ValueError("response_format of type 'structural_tag' needs structures "
                                 "and triggers.")
            sources["response_format"] = {"structural_tag": {"structures": rf.structures,
                                                             "triggers": rf.triggers}}
        if self.structured_outputs is not None:
            sources["structured_outputs"] = dict(self.structured_outputs)
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                sources[name] = {key: getattr(self, name)}
        if len(sources) > 1:
            raise ValueError(f"Only one kind of structured outputs can be used per request, "
                             f"got {', '.join(sources)}.")
        if not sources:
            return None
        [(name, spec)] = sources.items()
        if self.guided_whitespace_pattern is not None:
            spec.setdefault("whitespace_pattern", self.guided_whitespace_pattern)
        try:
            return name, StructuredOutputsParams(**spec)
        except (TypeError, ValueError) as e:  # TypeError: an unknown key in structured_outputs
            raise ValueError(f"{name}: {e}") from None


# -- /v1/completions ------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: (StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]) = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists.")
    max_tokens: Annotated[int, Field(le=INT32_MAX)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: str | None = None  # not supported: 400 when set

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a set field we do not implement, else None."""
        if self.suffix:
            return "suffix", "suffix is not supported by this server (no fill-in-the-middle)."
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of different from n is not supported."
        return None


# -- /v1/embeddings (a pooling engine: jaxllm/engine/pooling.py) ----------------------------------
class EmbeddingRequest(_Model):
    model: str | None = None
    input: (StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]) = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None  # accepted and ignored
    # vLLM's extras
    truncate_prompt_tokens: Int32 | None = None
    normalize: bool | None = None
    request_id: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        return None


class PoolingRequest(EmbeddingRequest):
    """vLLM's /pooling: ``task`` names what to pool (LLM.encode's pooling_task); left out,
    every token's ("token_embed", or "token_classify" on a sequence classifier)."""

    task: Literal["embed", "token_embed", "classify", "token_classify"] | None = None


class PoolingData(_Response):
    object: Literal["pooling"] = "pooling"
    data: Any  # nested float lists ([E] or [tokens, E]), or base64 of the float32 bytes
    index: int


class PoolingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # base64: the little-endian float32 bytes
    index: int


class EmbeddingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


# -- /classify (a sequence classifier, vLLM's classify task) --------------------------------------
class ClassificationRequest(_Model):
    model: str | None = None
    input: (StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]) = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists.")
    user: str | None = None  # accepted and ignored
    truncate_prompt_tokens: Int32 | None = None
    request_id: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        return None


class ClassificationData(_Response):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


# -- /score and /rerank (a pooling engine: cosine similarity of embeddings, as vLLM's) -------------
class ScoreRequest(_Model):
    model: str | None = None
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    truncate_prompt_tokens: Int32 | None = None
    request_id: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        return None


class ScoreResponseData(_Response):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankRequest(_Model):
    model: str | None = None
    query: StrictStr
    documents: list[StrictStr]
    top_n: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0  # 0: every document
    truncate_prompt_tokens: Int32 | None = None
    request_id: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        return None


class RerankDocument(_Response):
    text: str


class RerankResult(_Response):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(_Response):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# -- /v1/chat/completions -------------------------------------------------------------------------
class TextContentPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCallParam(_Model):
    name: str
    arguments: str


class ToolCallParam(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """A part of another type (image_url, input_audio, file) gets one clear message
        instead of the union's three."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported: this "
                                     "server serves a text-only model (send 'text' parts)")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(le=INT32_MAX)] | None = None  # deprecated by OpenAI
    max_completion_tokens: Annotated[int, Field(le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    # OpenAI fields that cannot change the tokens: accepted, ignored.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    # Tool calling (server/tools.py)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # OpenAI fields we do not implement: 400 unless neutral.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    # vLLM extras for the template
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # needs the server's --trust-request-chat-template
    documents: list[dict[str, str]] | None = None  # for templates that take them (RAG)
    add_special_tokens: bool = False  # on top of the template's (BOS ...)
    echo: bool = False  # the reply starts with the last message when it is the assistant's

    def unsupported(self) -> tuple[str, str] | None:
        if self.functions or self.function_call not in (None, "none"):
            return "functions", ("functions / function_call (deprecated by OpenAI) are not "
                                 "supported; use tools / tool_choice.")
        if self.audio is not None:
            return "audio", "audio output is not supported by this server."
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return "modalities", "only the 'text' modality is supported."
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true."
        if self.add_generation_prompt and self.continue_final_message:
            return ("continue_final_message", "continue_final_message and add_generation_prompt "
                    "cannot both be true.")
        return None


# -- /tokenize, /detokenize -----------------------------------------------------------------------
class TokenizeRequest(_Model):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(_Response):
    prompt: str


# -- /v1/load_lora_adapter, /v1/unload_lora_adapter (server/lora.py) ------------------------------
class LoadLoRAAdapterRequest(_Model):
    """vLLM's /v1/load_lora_adapter body. Both names are checked by the route, so that a
    missing one gets vLLM's message; ``load_inplace``: replace a loaded adapter's weights."""

    lora_name: StrictStr | None = None
    lora_path: StrictStr | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Model):
    """vLLM's /v1/unload_lora_adapter body: the adapter by name or by id."""

    lora_name: StrictStr | None = None
    lora_int_id: StrictInt | None = None


# -- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_WithExtras):
    _EXTRAS = ("prompt_tokens_details",)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # --enable-prompt-tokens-details


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's prompt_logprobs entry (its Logprob): one candidate token of a prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # the first prompt token has none


class CompletionChoice(_WithExtras):
    _EXTRAS = ("prompt_logprobs", "prompt_token_ids", "token_ids")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string / token that ended it
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids (a stream: first chunk only)
    token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # as vLLM: [] when none
    reasoning: str | None = None  # --reasoning-parser (server/reasoning.py); left out if None

    @model_serializer(mode="wrap")
    def _without_null_reasoning(self, handler):
        out = handler(self)
        if out.get("reasoning", "") is None:
            del out["reasoning"]
        return out


class ChatChoice(_WithExtras):
    _EXTRAS = ("token_ids",)
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(_WithExtras):
    _EXTRAS = ("prompt_logprobs", "prompt_token_ids")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    """A streamed chat delta. The role goes in a choice's first delta only; the later ones
    leave the key out, as OpenAI's and vLLM's streams do (not ``"role": null``); tool_calls
    appear only in the deltas that carry calls."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _without_null_keys(self, handler):
        out = handler(self)
        for key in ("role", "tool_calls", "reasoning"):
            if key in out and out[key] is None:
                del out[key]
        return out


class ChatStreamChoice(_WithExtras):
    _EXTRAS = ("token_ids",)
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's


class ChatCompletionStreamResponse(_WithExtras):
    _EXTRAS = ("prompt_token_ids",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: the first chunk's


class VersionResponse(_Response):
    version: str


# -- OpenAPI --------------------------------------------------------------------------------------
def openapi_schema(version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document built from the models' JSON schemas."""
    from pydantic.json_schema import models_json_schema

    from server.responses import ResponseObject, ResponsesRequest

    models = [CompletionRequest, CompletionResponse, CompletionStreamResponse,
              ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse,
              ResponsesRequest, ResponseObject,
              TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse,
              EmbeddingRequest, EmbeddingResponse, ClassificationRequest, ClassificationResponse,
              PoolingRequest, PoolingResponse,
              ScoreRequest, ScoreResponse, RerankRequest, RerankResponse, ModelList, ModelCard,
              ErrorResponse, VersionResponse]
    keyed, defs = models_json_schema([(m, "validation") for m in models],
                                     ref_template="#/components/schemas/{model}")

    def ref(m: type[BaseModel]) -> dict[str, str]:
        return keyed[(m, "validation")]

    def json_body(m):
        return {"content": {"application/json": {"schema": ref(m)}}}

    errors = {str(code): {"description": desc, **json_body(ErrorResponse)} for code, desc in (
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "request body too large"), (429, "too many requests in flight"),
        (503, "engine unavailable"))}

    def post(req, resp, stream_resp=None, summary=""):
        ok = json_body(resp)
        if stream_resp is not None:
            ok["content"]["text/event-stream"] = {"schema": ref(stream_resp)}
        return {"post": {"summary": summary, "requestBody": {"required": True, **json_body(req)},
                         "responses": {"200": {"description": "OK", **ok}, **errors}}}

    def get(resp, summary=""):
        ok = {"description": "OK"}
        if resp is not None:
            ok.update(json_body(resp))
        return {"get": {"summary": summary, "responses": {"200": ok}}}

    paths = {
        "/v1/models": get(ModelList, "List the served models"),
        "/v1/models/{model}": {"get": {
            "summary": "One served model", "parameters": [{
                "name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", **json_body(ModelCard)},
                          "404": errors["404"]}}},
        "/v1/completions": post(CompletionRequest, CompletionResponse, CompletionStreamResponse,
                                "Text completion"),
        "/v1/chat/completions": post(ChatCompletionRequest, ChatCompletionResponse,
                                     ChatCompletionStreamResponse, "Chat completion"),
        "/v1/responses": post(ResponsesRequest, ResponseObject,
                              summary="OpenAI Responses API (text and function tools)"),
        "/v1/responses/{response_id}": {"get": {
            "summary": "A stored response (VLLM_ENABLE_RESPONSES_API_STORE=1; also DELETE, "
                       "and POST .../cancel for a background one)",
            "parameters": [{"name": "response_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", **json_body(ResponseObject)},
                          "404": errors["404"]}}},
        "/v1/messages": {"post": {
            "summary": "Anthropic's Messages API (server/anthropic.py); also "
                       "/v1/messages/count_tokens",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object"}}}},
            "responses": {"200": {"description": "an Anthropic Message, or its events "
                                                 "(stream)"}}}},
        "/v1/embeddings": post(EmbeddingRequest, EmbeddingResponse,
                               summary="Embeddings (a pooling model)"),
        "/classify": post(ClassificationRequest, ClassificationResponse,
                          summary="Class probabilities (a sequence classification model)"),
        "/pooling": post(PoolingRequest, PoolingResponse,
                         summary="vLLM's pooling tasks (LLM.encode): every token's states by "
                                 "default, or task embed / classify / token_*"),
        "/v1/score": post(ScoreRequest, ScoreResponse,
                          summary="Text-pair scores: cosine similarity of embeddings (also "
                                  "/score)"),
        "/v1/rerank": post(RerankRequest, RerankResponse,
                           summary="Documents ranked against a query (also /rerank, "
                                   "/v2/rerank)"),
        "/tokenize": post(TokenizeRequest, TokenizeResponse, summary="Tokenize a prompt"),
        "/detokenize": post(DetokenizeRequest, DetokenizeResponse, summary="Decode token ids"),
        "/health": get(None, "200 when the engine runs, 503 when it has failed"),
        "/ping": get(None, "/health for SageMaker (GET or POST)"),
        "/invocations": {"post": {
            "summary": "SageMaker: a chat, completion, embeddings, classify, score or rerank "
                       "body, sent to the first route of the model's that takes it",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "anyOf": [ref(m) for m in (ChatCompletionRequest, CompletionRequest,
                                           EmbeddingRequest, ClassificationRequest,
                                           ScoreRequest, RerankRequest)]}}}},
            "responses": {"200": {"description": "the chosen route's answer"}, **errors}}},
        "/version": get(VersionResponse, "Server version"),
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    return {"openapi": "3.1.0", "info": {"title": "jaxllm OpenAI-compatible API",
                                         "version": version},
            "paths": paths, "components": {"schemas": defs.get("$defs", {})}}
