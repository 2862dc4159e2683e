"""OpenAI request / response bodies (pydantic, the only place pydantic is used).

Unknown fields are REJECTED with 400 "Unrecognized request argument supplied: <field>" (OpenAI's
behaviour, not vLLM's silent ignore): a typo such as `max_token` would otherwise silently fall back to a
default. vLLM's documented extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, ...) are
accepted, so clients written for vLLM keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

_MAX_N = 128
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _conflict(param: str, message: str) -> PydanticCustomError:
    """A whole-request rule broken: server/errors.py reports `message` as is, with `param` as the field."""
    return PydanticCustomError("request_conflict", "{message}", {"message": message, "param": param})


def _prompt_shape(v: Any) -> Any:
    """OpenAI's four prompt forms; a list mixing them gets one clear error, not one per union member."""
    if isinstance(v, list) and v:
        kinds = {_plural_kind(x) for x in v}
        if len(kinds) > 1 or kinds - {"strings", "integers", "lists"}:
            raise PydanticCustomError(
                "prompt_shape", "a list must hold only strings, only token ids (integers) or only lists of token "
                "ids; got a list of {kinds}", {"kinds": " and ".join(sorted(kinds))})
    return v


def _plural_kind(x: Any) -> str:
    if isinstance(x, bool):
        return "booleans"
    kinds = {str: "strings", int: "integers", float: "numbers", list: "lists", dict: "objects", type(None): "nulls"}
    return kinds.get(type(x), type(x).__name__)


def _int64(v: int) -> int:
    """Integers cross to the engine core as msgpack int64: a larger one must be a 400 here, not a 500 there."""
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise PydanticCustomError("int64_range", "must be an integer in [-2^63, 2^63-1] "
                                  "([-9223372036854775808, 9223372036854775807])", {})
    return v


# Every integer field that reaches the engine: OpenAI's own spec bounds `seed` to this range too.
Int64 = Annotated[StrictInt, AfterValidator(_int64)]

PromptInput = Annotated[StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]],
                        BeforeValidator(_prompt_shape)]


class StreamOptions(_Strict):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat (OpenAI's plus vLLM's extras)."""

    model: StrictStr | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[StrictInt, Field(ge=1, le=_MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Int64 = 0
    best_of: Int64 | None = None
    prompt_logprobs: Int64 | None = None  # top-k per prompt position; checked by SamplingParams
    # vLLM's prefix-cache isolation: only requests with the same salt share cached blocks (checked by SamplingParams)
    cache_salt: StrictStr | None = None
    # Decoding constraints: OpenAI's response_format and vLLM's structured_outputs, both checked (shape, size,
    # compile) in server/structured_outputs.py so errors name the field; any JSON object passes here.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _request_rules(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise _conflict("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        bad = self._unsupported()
        if bad is not None:
            raise _conflict(bad[0], f"{bad[0]} is not supported yet by this server ({bad[1]}); remove the field.")
        return self

    def _unsupported(self) -> tuple[str, str] | None:
        """(field, what is accepted) for the first field set to something the server cannot do yet."""
        return None


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: Int64 | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    add_special_tokens: StrictBool = True


def _text_only(v: Any) -> Any:
    if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] != "text":
        raise PydanticCustomError("unsupported_content", "content part type '{kind}' is not supported (this model "
                                  "takes text only; send {\"type\": \"text\", \"text\": ...} parts)",
                                  {"kind": v["type"]})
    return v


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ToolCallFunction(_Strict):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI returns it


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made (sent back in the conversation)."""

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[Annotated[TextPart, BeforeValidator(_text_only)]] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # role "tool": the call this result answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int64 | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: StrictBool = False
    # Tools: checked in server/tool_calls.py (plan_tools), which names the field in its 400s.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's deprecated function-calling fields stay refused: `tools` / `tool_choice` replace them.
    functions: list[Any] | None = None
    function_call: Any = None

    def _unsupported(self) -> tuple[str, str] | None:
        if self.functions:
            return "functions", "deprecated by OpenAI; send `tools` instead"
        if self.function_call not in (None, "none"):
            return "function_call", "deprecated by OpenAI; send `tool_choice` instead"
        return super()._unsupported()


class EmbeddingRequest(_Strict):
    model: StrictStr | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int64 | None = None
    user: StrictStr | None = None


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt]


# ---- responses (plain dicts would do; models document the shape and keep field order) ----


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx body (server/errors.py)."""

    error: ErrorDetail
