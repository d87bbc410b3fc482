"""The HTTP front ends' request bodies as pydantic models: OpenAI's /v1/chat/completions and /v1/completions,
GaC's /api/generate. Each checks its body's shapes and types, then builds the domain GenerationRequests by
request_rules, the rules the gRPC API's requests meet too.

A body's first problem is a 400 naming its field (OpenAI's `param`: `messages[1].role`). OpenAI fields
this server cannot honour are refused (unless null or their no-op value); unknown fields too: nothing is
silently ignored. GaC's API ignores fields it does not know, as GaC's own server does.
"""

from __future__ import annotations

import contextlib
import math
import struct
from abc import abstractmethod
from dataclasses import replace
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from chorus_common.types import Prompt
from coordinator import request_rules as rules
from coordinator.config import EnsembleConfig
from coordinator.failures import BadRequest, ModelNotFound
from coordinator.logprobs import MAX_TOP
from coordinator.types import GenerationRequest

Json = dict[str, Any]

# OpenAI fields this server cannot honour: why, and the values that ask for nothing (accepted, as null is).
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "response_format": ("structured output (JSON mode, JSON schemas) is not supported", ({"type": "text"},)),
    "tools": ("tool calling is not supported", ()),
    "tool_choice": ("tool calling is not supported", ("none",)),
    "parallel_tool_calls": ("tool calling is not supported", ()),
    "functions": ("function calling is not supported", ()),
    "function_call": ("function calling is not supported", ("none",)),
    "logit_bias": ("logit bias is not supported", ({},)),
    "audio": ("audio output is not supported", ()),
    "modalities": ("only text output is supported", (["text"],)),
    "prediction": ("predicted outputs are not supported", ()),
    "frequency_penalty": ("frequency penalties are not supported", (0,)),
    "presence_penalty": ("presence penalties are not supported", (0,)),
    "reasoning_effort": ("reasoning effort is not supported", ()),
    "verbosity": ("verbosity is not supported", ()),
    "web_search_options": ("web search is not supported", ()),
    "store": ("completions are not stored", (False,)),
    "service_tier": ("there is one service tier (auto, default)", ("auto", "default")),
    "prompt_cache_key": ("prompt cache keys are not supported", ()),
    "echo": ("echoing the prompt is not supported", (False,)),
    "best_of": ("best_of is not supported (n gives independent samples)", (1,)),
    "suffix": ("suffix (insertion) is not supported", ()),
}
# Message keys clients echo back empty with an assistant message; with a value they are refused.
_MESSAGE_EMPTY_OK = ("name", "tool_calls", "function_call", "refusal", "audio", "annotations")
# pydantic's own type errors, as this API words them.
_EXPECTED = {
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "int_type": "expected an integer",
    "model_type": "expected an object",
}


class _Refused(ValueError):
    """A validator's refusal; sub: where inside the value it validates (nothing: that value itself)."""

    def __init__(self, message: str, *sub: str | int) -> None:
        super().__init__(message)
        self.sub = sub


def _same(value: Any, no_op: Any) -> bool:
    """value is the no-op value (true is not 1, nor false 0)."""
    if isinstance(value, bool) or isinstance(no_op, bool):
        return value is no_op
    return bool(value == no_op)


def _param(loc: tuple[str | int, ...]) -> str:
    """A pydantic location as OpenAI's `param` names it: ("messages", 1, "role") -> messages[1].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _bad_request(error: ErrorDetails) -> BadRequest:
    cause = error.get("ctx", {}).get("error")
    where = _param((*error["loc"], *getattr(cause, "sub", ())))
    if isinstance(cause, ValueError):
        message = str(cause)
    else:
        message = f"{_EXPECTED.get(error['type'], error['msg'])}, got {error['input']!r:.40}"
    return BadRequest(f"{where}: {message}", where)


# --- values: JSON as this API reads it --------------------------------------------------------------


def _integer(value: Any) -> int:
    """A JSON integer, or a string or whole float that is one."""
    number = None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            number = int(value)
    if number is None or (isinstance(value, float) and number != value):
        raise ValueError(f"expected an integer, got {value!r:.40}")
    return number


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _single(value: Any) -> float:
    """A JSON number at the precision of the gRPC API's float fields, so that a request gives the same
    samples over either API; past that range, infinite (which the rules refuse)."""
    if not _is_number(value):
        raise ValueError(f"expected a number, got {value!r:.40}")
    try:
        number = float(value)
        return float(struct.unpack("f", struct.pack("f", number))[0])
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _logprobs_top(value: int) -> int:
    if not 0 <= value <= MAX_TOP:
        raise ValueError(f"{value} is outside 0..{MAX_TOP}")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("expected a string or a list of strings")
    return tuple(stop)


def _weights(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
        raise ValueError("expected an object of model name -> number")
    try:
        return {name: _single(float(v)) for name, v in value.items()}
    except OverflowError:
        raise ValueError("a weight is too large") from None


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected an object of string -> string")
    return value


def _prompts(value: Any) -> tuple[str, ...]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("expected a string or a non-empty list of strings")
    return tuple(prompts)


def _objects(value: Any) -> Any:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError("expected a list of {role, content} objects")
    return value


def _conversations(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of conversations")
    return value


def _text(content: Any) -> str | None:
    """A message's content: a string, or OpenAI content parts of type text (others are refused); None if
    it is neither."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text":
                raise _Refused(f"only text content parts are supported, got {kind!r:.40}", "content", j)
            texts.append(part.get("text"))
        content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
    return content if isinstance(content, str) else None


Integer = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_single)]
LogprobsTop = Annotated[int, BeforeValidator(_integer), AfterValidator(_logprobs_top)]
Stop = Annotated[tuple[str, ...], BeforeValidator(_stop)]
Weights = Annotated[dict[str, float], BeforeValidator(_weights)]
StringMap = Annotated[dict[str, str], BeforeValidator(_string_map)]
Prompts = Annotated[tuple[str, ...], BeforeValidator(_prompts)]


# --- messages -----------------------------------------------------------------------------------------


class Message(BaseModel):
    """A message as GaC sends it: role and content (a string, or OpenAI's text parts); other keys ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: str
    content: str

    @classmethod
    def _vet(cls, data: Json) -> Json:
        """The message's keys, refused or rewritten (before its role and content are read)."""
        return data

    @model_validator(mode="before")
    @classmethod
    def _role_and_text(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Refused("expected a {role, content} object")
        data = cls._vet(data)
        content = _text(data.get("content", ""))
        if content is None or not isinstance(data.get("role"), str):
            raise _Refused("role and content must be strings")
        return {"role": data["role"], "content": content}


class OpenAIMessage(Message):
    """OpenAI's: developer is system; tool messages, names, tool calls and unknown keys are refused (empty
    ones are accepted, as clients echo an assistant message back)."""

    @classmethod
    def _vet(cls, data: Json) -> Json:
        role = data.get("role")
        if role == "developer":  # OpenAI's name for system instructions to newer models
            role = "system"
        if role in ("tool", "function"):
            raise _Refused(f"{role!r} messages answer tool calls; tools are not supported", "role")
        for key, value in data.items():
            if key in ("role", "content") or value is None or (key in _MESSAGE_EMPTY_OK and value in ("", [])):
                continue
            if key in _MESSAGE_EMPTY_OK:
                raise _Refused("not supported (messages are role and content)", key)
            raise _Refused("unknown field", key)
        return {**data, "role": role}


Conversation = Annotated[tuple[Message, ...], BeforeValidator(_objects)]
OpenAIConversation = Annotated[tuple[OpenAIMessage, ...], BeforeValidator(_objects)]


def _messages(conversation: tuple[Message, ...]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation]


# --- bodies -------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Null is as good as absent: every field is optional, or refuses null with its own words.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def parse(cls, body: Json, config: EnsembleConfig) -> Self:
        """The body read as this model, for an ensemble of this config (validators find it as their
        context); its first problem is a 400 naming the field."""
        try:
            return cls.model_validate(body, context=config)
        except ValidationError as exc:
            raise _bad_request(exc.errors()[0]) from None


class StreamOptions(BaseModel):
    """OpenAI's stream_options: include_usage (include_obfuscation is accepted while off)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    include_usage: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _include_usage_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if key != "include_usage" and not (key == "include_obfuscation" and value in (None, False)):
                    raise _Refused("not supported (include_usage is)", key)
        return data


class OpenAIRequest(_Body):
    """What /v1/chat/completions and /v1/completions share, with Chorus's own fields (extra body fields for
    OpenAI clients: strategy, threshold, weights, top_k, apply_chat_template, on_worker_loss)."""

    model: StrictStr | None = None  # the ensemble (ENSEMBLE_ID, or none) or one member alone
    n: Integer | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: Stop | None = None
    strategy: StrictStr | None = None
    threshold: Number | None = None
    weights: Weights | None = None
    top_k: StrictInt | None = None
    apply_chat_template: StrictBool | None = None
    on_worker_loss: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, data: Any) -> Any:
        for name, value in data.items() if isinstance(data, dict) else ():
            if name in cls.model_fields or value is None:
                continue
            if name not in UNSUPPORTED:
                raise _Refused("unknown field", name)
            why, no_ops = UNSUPPORTED[name]
            if not any(_same(value, ok) for ok in no_ops):
                raise _Refused(why, name)
        return data

    @field_validator("model")
    @classmethod
    def _served(cls, model: str | None, info: ValidationInfo) -> str | None:
        """A model that is neither the ensemble nor one of its members: 404, as OpenAI answers (raised at
        once, before the other fields' problems)."""
        names = info.context.model_names
        if model and model != rules.ENSEMBLE_ID and model not in names:
            raise ModelNotFound(
                f"The model {model!r} does not exist: {rules.ENSEMBLE_ID!r} is the ensemble, "
                f"its members are {', '.join(names)}"
            )
        return model

    @field_validator("n")
    @classmethod
    def _at_most_conversations(cls, n: int | None, info: ValidationInfo) -> int | None:
        most = info.context.limits.max_conversations
        if n is not None and not 1 <= n <= most:
            raise ValueError(f"{n} is outside 1..{most}")
        return n

    @model_validator(mode="after")
    def _stream_options_with_a_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise _Refused("only with stream: true", "stream_options")
        return self

    @property
    def member(self) -> str | None:
        """The member `model` names, alone; None: the whole ensemble."""
        return None if self.model in (None, "", rules.ENSEMBLE_ID) else self.model

    @property
    def samples(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @abstractmethod
    def logprobs_top(self) -> int | None:
        """Alternatives per token when logprobs are asked; None: not asked."""

    @abstractmethod
    def prompts(self, config: EnsembleConfig) -> list[Prompt]:
        """The prompts, each generated n times."""

    def caller(self) -> Json:
        """Who the client says is asking (logged with the request)."""
        names = ("user", "safety_identifier", "metadata")
        return {k: v for k in names if (v := getattr(self, k, None)) is not None}

    def requests(self, config: EnsembleConfig, request_id: str) -> list[GenerationRequest]:
        """n samples of each prompt, sample j seeded seed + j; with logprobs if asked."""
        n = self.samples
        prompts = self.prompts(config)
        asked = self._asked(config, request_id)
        batches = [rules.build_requests([p], asked, config) for p in prompts]  # each prompt seeded alike
        rules.check_conversations(len(prompts) * n, config, "n", "conversations (prompts x n)")
        logprobs = self.logprobs_top()
        requests = [
            replace(r, seed=None if r.seed is None else r.seed + j, logprobs=logprobs)
            for batch in batches
            for r in batch
            for j in range(n)
        ]
        rules.check_logprobs(requests[0])  # every sample has the same strategy
        return requests

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _asked(self, config: EnsembleConfig, request_id: str) -> rules.Asked:
        # OpenAI's documented defaults where the config's `defaults:` sets none: temperature 1, top_p 1, and no
        # cap on new tokens but the model's context and limits.max_new_tokens.
        configured = config.defaults.model_fields_set

        def openai(value: Any, field: str, default: Any) -> Any:
            return default if value is None and field not in configured else value

        return rules.Asked(
            max_new_tokens=openai(self._max_tokens(), "max_new_tokens", config.limits.max_new_tokens),
            strategy=self.strategy or "",
            temperature=openai(self.temperature, "temperature", 1.0),
            top_p=openai(self.top_p, "top_p", 1.0),
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop or (),
            threshold=self.threshold,
            weights=self.weights or {},
            on_worker_loss=self.on_worker_loss or "",
            model=self.member or "",
            request_id=request_id,
        )


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: OpenAIConversation = Field(None, validate_default=True)  # absent or null: refused in its words
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens, which it overrides
    logprobs: StrictBool | None = None
    top_logprobs: LogprobsTop | None = None
    metadata: StringMap | None = None
    safety_identifier: StrictStr | None = None

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise _Refused("needs logprobs: true", "top_logprobs")
        return self

    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def prompts(self, config: EnsembleConfig) -> list[Prompt]:
        template = True if self.apply_chat_template is None else self.apply_chat_template
        return [rules.conversation(_messages(self.messages), template, "messages")]


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: Prompts = Field(None, validate_default=True)  # absent or null: refused in its words
    logprobs: LogprobsTop | None = None

    def logprobs_top(self) -> int | None:
        return self.logprobs

    def prompts(self, config: EnsembleConfig) -> list[Prompt]:
        rules.check_conversations(len(self.prompt), config, "prompt", "prompts")
        return [rules.text_prompt(p, self.apply_chat_template) for p in self.prompt]


class GacRequest(_Body):
    """GaC's POST /api/generate/: {"messages_list": [[...], ...]} with max_new_tokens, max_length (GaC's cap
    on the length: taken as a cap on new tokens), until and apply_chat_template."""

    messages_list: Annotated[tuple[Conversation, ...], BeforeValidator(_conversations)] = Field(
        None, validate_default=True
    )
    max_new_tokens: Integer | None = None
    max_length: Integer | None = None
    until: Stop | None = None
    apply_chat_template: StrictBool | None = None

    def requests(self, config: EnsembleConfig, request_id: str) -> list[GenerationRequest]:
        rules.check_conversations(len(self.messages_list), config, "messages_list")
        template = config.defaults.apply_chat_template if self.apply_chat_template is None else self.apply_chat_template
        prompts = [
            rules.conversation(_messages(c), template, f"messages_list[{i}]") for i, c in enumerate(self.messages_list)
        ]
        caps = [cap for cap in (self.max_new_tokens, self.max_length) if cap is not None]
        asked = rules.Asked(max_new_tokens=min(caps, default=None), stop=self.until or (), request_id=request_id)
        return rules.build_requests(prompts, asked, config)
