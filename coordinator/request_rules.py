"""The rules a generation request meets, whichever front end it came by: gRPC (convert.py reads its
protobuf) or HTTP (http_models.py reads its JSON). Each reads what the client asked into `Asked` and its
prompts, and build_requests checks them against the config and makes the domain GenerationRequests.

Every failure is an InvalidRequest whose message names the field first (its OpenAI `param`), and
quotes at most SHOWN characters of what the client sent.

Bounds (documented in README's "Limits of a request"): the config's limits (prompt bytes, new tokens,
conversations) and the constants below, which hold whatever the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from chorus_common.types import Prompt, SamplingParams
from coordinator.config import EnsembleConfig
from coordinator.strategies import STRATEGIES
from coordinator.types import GenerationRequest

ROLES = ("system", "user", "assistant")
ENSEMBLE_ID = "chorus"  # the whole ensemble, as a request's `model` (HTTP and gRPC) names it
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256  # per stop string, UTF-8: it is matched against the tail of the text at every step
# A request id is written into every log line of its request: short, and printable (no line breaks).
MAX_REQUEST_ID_BYTES = 128
SHOWN = 40  # characters of a refused value quoted in the error
MAX_TEMPERATURE = 100.0
# The gRPC API's widths (uint32 top_k, uint64 seed), which the workers' API carries on: HTTP's bounds too.
MAX_TOP_K = 2**32 - 1
MAX_SEED = 2**64 - 1


class InvalidRequest(ValueError):
    """A request that breaks a rule; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Asked:
    """What a request asks besides its prompts; None or empty: not asked (the config's default)."""

    max_new_tokens: int | None = None
    strategy: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    threshold: float | None = None
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # by model name
    on_worker_loss: str = ""
    model: str = ""  # "" or ENSEMBLE_ID: the whole ensemble; a member's name: that member alone
    request_id: str = ""


def conversation(messages: Sequence[tuple[str, str]], template: bool, field: str) -> Prompt:
    """A conversation's (role, content) messages as a prompt; field: where the request holds them."""
    if not messages:
        raise InvalidRequest(f"{field}: no messages")
    for i, (role, _) in enumerate(messages):
        if role not in ROLES:
            raise InvalidRequest(f"{field}[{i}].role: unknown role {_shown(role)}, expected one of {ROLES}")
    return Prompt(messages=tuple(messages), apply_chat_template=template)


def text_prompt(text: str, template: bool | None) -> Prompt:
    """A text prompt, which goes to every model as it is; a chat template applies to messages, so a request
    that asks for one on a text prompt is refused rather than served without it."""
    if template:
        raise InvalidRequest(
            "apply_chat_template: true applies to messages; a text prompt goes to the models as it is "
            "(send it as a user message to have each model's chat template rendered)"
        )
    return Prompt(text=text)


def check_conversations(count: int, config: EnsembleConfig, field: str, what: str = "conversations") -> None:
    """At most limits.max_conversations conversations in one request."""
    most = config.limits.max_conversations
    if count > most:
        raise InvalidRequest(f"{field}: {count} {what}, at most {most}")


def build_requests(prompts: Sequence[Prompt], asked: Asked, config: EnsembleConfig) -> list[GenerationRequest]:
    """One GenerationRequest per prompt, with the config's defaults for what was not asked; conversation i
    is seeded seed + i."""
    defaults, limits = config.defaults, config.limits
    for p in prompts:
        size = len(p.text.encode()) if p.text is not None else sum(len(c.encode()) for _, c in p.messages)
        if p.text is not None and not p.text:
            raise InvalidRequest("prompt: empty")
        if size > limits.max_prompt_bytes:
            raise InvalidRequest(f"prompt: {size} bytes, at most {limits.max_prompt_bytes}")

    max_new = defaults.max_new_tokens if asked.max_new_tokens is None else asked.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens: {max_new} is outside 1..{limits.max_new_tokens}")
    model = member_named(asked.model, config)
    scope = config if model is None else config.alone(model)  # a member alone: the config of it alone
    strategy = asked.strategy or scope.strategy
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"strategy: unknown {_shown(strategy)}, expected one of {sorted(STRATEGIES)}")
    if STRATEGIES[strategy].needs_primary and scope.primary_index is None:
        alone = f" (model {model!r} alone is not the primary)" if model is not None else ""
        raise InvalidRequest(f"strategy: {strategy!r} needs a model with priority primary in the config{alone}")
    top_k = defaults.top_k if asked.top_k is None else _integer("top_k", asked.top_k, 0, MAX_TOP_K)
    sampling = SamplingParams(
        temperature=_number("temperature", asked.temperature, defaults.temperature, 0.0, MAX_TEMPERATURE),
        top_p=_number("top_p", asked.top_p, defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=top_k,
    )
    try:
        STRATEGIES[strategy].check(sampling)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    # A probability: the primary decides alone while its top probability is above it (1: never).
    threshold = _number("threshold", asked.threshold, config.threshold, 0.0, 1.0)
    if asked.threshold is not None and strategy != "threshold":
        unread = "only the threshold strategy reads it"
        raise InvalidRequest(f"threshold: {unread}; this request's strategy is {strategy!r}")
    _check_stop(asked.stop)
    _check_request_id(asked.request_id)
    seed = None if asked.seed is None else _integer("seed", asked.seed, 0, MAX_SEED)
    weights = _weights(asked.weights, scope)
    on_loss = asked.on_worker_loss or defaults.on_worker_loss
    if on_loss not in ("fail", "degrade"):
        raise InvalidRequest(f"on_worker_loss: {_shown(on_loss)} is not 'fail' or 'degrade'")
    return [
        GenerationRequest(
            prompt=p,
            max_new_tokens=max_new,
            strategy=strategy,
            sampling=sampling,
            # Each conversation of a batch gets its own stream of random numbers.
            seed=None if seed is None else seed + i,
            stop=asked.stop,
            threshold=threshold,
            request_id=asked.request_id,
            on_worker_loss=on_loss,
            weights=weights,
            step_timeout=limits.step_timeout_s,
            first_step_timeout=limits.first_step_timeout_s,
            replica_wait=limits.replica_wait_s,
            model=model,
        )
        for i, p in enumerate(prompts)
    ]


def member_named(model: str, config: EnsembleConfig) -> str | None:
    """The member a request's `model` names; None for the whole ensemble ("" or ENSEMBLE_ID)."""
    if model in ("", ENSEMBLE_ID):
        return None
    if model not in config.model_names:
        raise InvalidRequest(
            f"model: unknown model {_shown(model)}; {ENSEMBLE_ID!r} is the ensemble, its models are "
            f"{list(config.model_names)}"
        )
    return model


def check_logprobs(request: GenerationRequest) -> None:
    """Refuse logprobs for strategies that accept tokens drawn inside a worker: the coordinator has no
    distribution those were drawn from."""
    if request.logprobs is not None and STRATEGIES[request.strategy].drafts:
        raise InvalidRequest(
            f"logprobs: strategy {request.strategy!r} accepts tokens a model drew in its worker, with no "
            f"distribution the ensemble drew them from; ask another strategy (e.g. gac) for logprobs"
        )


def _weights(asked: Mapping[str, float], config: EnsembleConfig) -> tuple[float, ...]:
    """Per-request weights by model name over the configured ones, normalised; () if none given."""
    if not asked:
        return ()
    names = config.model_names
    for name, value in asked.items():
        if name not in names:
            raise InvalidRequest(f"weights: unknown model {_shown(name)}, the request's models are {list(names)}")
        if not math.isfinite(value) or value <= 0:
            raise InvalidRequest(f"weights[{name!r}]: {value} must be a finite number > 0")
    raw = [asked.get(name, w) for name, w in zip(names, config.weight_vector(), strict=True)]
    return tuple(w / sum(raw) for w in raw)


def _check_stop(stop: Sequence[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: {len(stop)} stop strings, at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest(f"stop[{i}]: empty stop string")
        size = len(s.encode())
        if size > MAX_STOP_BYTES:
            raise InvalidRequest(f"stop[{i}]: {size} bytes, at most {MAX_STOP_BYTES}")


def _check_request_id(request_id: str) -> None:
    size = len(request_id.encode())
    if size > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"request_id: {size} bytes, at most {MAX_REQUEST_ID_BYTES}")
    if not request_id.isprintable():
        raise InvalidRequest(f"request_id: {_shown(request_id)} has a character that is not printable")


def _shown(value: str) -> str:
    """A client's string as an error quotes it: its repr, cut to SHOWN characters."""
    return repr(value) if len(value) <= SHOWN else f"{value[:SHOWN]!r}..."


def _number(field: str, value: float | None, default: float, low: float, high: float, low_open: bool = False) -> float:
    if value is None:
        return default
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bound = "(" if low_open else "["
        raise InvalidRequest(f"{field}: {value} is outside {bound}{low}, {high}]")
    return value


def _integer(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(f"{field}: {value} is outside {low}..{high}")
    return value
