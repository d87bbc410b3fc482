"""Protobuf <-> domain for the coordinator's public API, with request validation.

Every rule a request must meet is checked here, and each failure names its field.
"""

from __future__ import annotations

import math

from chorus.v1 import common_pb2, coordinator_pb2
from chorus_common.types import Prompt, SamplingParams
from coordinator.config import EnsembleConfig
from coordinator.ensemble import Ensemble
from coordinator.strategies import STRATEGIES
from coordinator.types import Finished, GenerationRequest, TextPiece, Usage

ROLES = ("system", "user", "assistant")
ENSEMBLE_ID = "chorus"  # the whole ensemble, as a request's `model` (HTTP and gRPC) names it
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0


class InvalidRequest(ValueError):
    """A request that breaks a rule; the message names the field."""


def requests_from_proto(request: coordinator_pb2.GenerateRequest, config: EnsembleConfig) -> list[GenerationRequest]:
    """One GenerationRequest per conversation of the request."""
    defaults, limits = config.defaults, config.limits
    template = request.apply_chat_template if request.HasField("apply_chat_template") else defaults.apply_chat_template
    kind = request.WhichOneof("input")
    if kind == "prompt":
        prompts = [Prompt(text=request.prompt)]
    elif kind == "messages":
        prompts = [_conversation(request.messages, template, "messages")]
    elif kind == "batch":
        conversations = request.batch.conversations
        if not conversations:
            raise InvalidRequest("batch.conversations: empty")
        if len(conversations) > limits.max_conversations:
            raise InvalidRequest(
                f"batch.conversations: {len(conversations)} conversations, at most {limits.max_conversations}"
            )
        prompts = [_conversation(c, template, f"batch.conversations[{i}]") for i, c in enumerate(conversations)]
    else:
        raise InvalidRequest("input: give prompt, messages or batch")
    for p in prompts:
        size = len(p.text.encode()) if p.text is not None else sum(len(c.encode()) for _, c in p.messages)
        if p.text is not None and not p.text:
            raise InvalidRequest("prompt: empty")
        if size > limits.max_prompt_bytes:
            raise InvalidRequest(f"prompt: {size} bytes, at most {limits.max_prompt_bytes}")

    max_new = request.max_new_tokens if request.HasField("max_new_tokens") else defaults.max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens: {max_new} is outside 1..{limits.max_new_tokens}")
    model = member_named(request.model, config)
    scope = config if model is None else config.alone(model)  # a member alone: the config of it alone
    strategy = request.strategy or scope.strategy
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"strategy: unknown {strategy!r}, expected one of {sorted(STRATEGIES)}")
    if STRATEGIES[strategy].needs_primary and scope.primary_index is None:
        alone = f" (model {model!r} alone is not the primary)" if model is not None else ""
        raise InvalidRequest(f"strategy: {strategy!r} needs a model with priority primary in the config{alone}")
    sampling = SamplingParams(
        temperature=_number(request, "temperature", defaults.temperature, 0.0, MAX_TEMPERATURE),
        top_p=_number(request, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=request.top_k if request.HasField("top_k") else defaults.top_k,
    )
    try:
        STRATEGIES[strategy].check(sampling)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    threshold = _number(request, "threshold", config.threshold, 0.0, math.inf)
    stop = tuple(request.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: {len(stop)} stop strings, at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest(f"stop[{i}]: empty stop string")
    seed = request.seed if request.HasField("seed") else None
    weights = _weights(request, scope)
    on_loss = request.on_worker_loss or defaults.on_worker_loss
    if on_loss not in ("fail", "degrade"):
        raise InvalidRequest(f"on_worker_loss: {on_loss!r} is not 'fail' or 'degrade'")
    return [
        GenerationRequest(
            prompt=p,
            max_new_tokens=max_new,
            strategy=strategy,
            sampling=sampling,
            # Each conversation of a batch gets its own stream of random numbers.
            seed=None if seed is None else seed + i,
            stop=stop,
            threshold=threshold,
            request_id=request.request_id,
            on_worker_loss=on_loss,
            weights=weights,
            step_timeout=limits.step_timeout_s,
            first_step_timeout=limits.first_step_timeout_s,
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
            f"model: unknown model {model!r}; {ENSEMBLE_ID!r} is the ensemble, its models are "
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


def _weights(request: coordinator_pb2.GenerateRequest, config: EnsembleConfig) -> tuple[float, ...]:
    """Per-request weights by model name over the configured ones, normalised; () if none given."""
    if not request.weights:
        return ()
    names = config.model_names
    for name, value in request.weights.items():
        if name not in names:
            raise InvalidRequest(f"weights: unknown model {name!r}, the request's models are {list(names)}")
        if not math.isfinite(value) or value <= 0:
            raise InvalidRequest(f"weights[{name!r}]: {value} must be a finite number > 0")
    raw = [request.weights.get(name, w) for name, w in zip(names, config.weight_vector(), strict=True)]
    return tuple(w / sum(raw) for w in raw)


def _conversation(conv: common_pb2.Conversation, template: bool, field: str) -> Prompt:
    messages = tuple((m.role, m.content) for m in conv.messages)
    if not messages:
        raise InvalidRequest(f"{field}: no messages")
    for i, (role, _) in enumerate(messages):
        if role not in ROLES:
            raise InvalidRequest(f"{field}[{i}].role: unknown role {role!r}, expected one of {ROLES}")
    return Prompt(messages=messages, apply_chat_template=template)


def _number(
    request: coordinator_pb2.GenerateRequest,
    field: str,
    default: float,
    low: float,
    high: float,
    low_open: bool = False,
) -> float:
    if not request.HasField(field):
        return default
    value = float(getattr(request, field))
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bound = "(" if low_open else "["
        raise InvalidRequest(f"{field}: {value} is outside {bound}{low}, {high}]")
    return value


def event_to_proto(index: int, event: TextPiece | Finished) -> coordinator_pb2.GenerateResponse:
    if isinstance(event, TextPiece):
        return coordinator_pb2.GenerateResponse(index=index, text=event.text)
    return coordinator_pb2.GenerateResponse(
        index=index,
        done=coordinator_pb2.Completion(
            finish_reason=event.finish_reason,
            text=event.text,
            usage=_usage_to_proto(event.usage),
            request_id=event.request_id,
        ),
    )


def _usage_to_proto(usage: Usage) -> coordinator_pb2.Usage:
    return coordinator_pb2.Usage(
        completion_tokens=usage.completion_tokens,
        steps=usage.steps,
        steps_ensembled=usage.steps_ensembled,
        models=[
            coordinator_pb2.ModelUsage(
                name=m.name, prompt_tokens=m.prompt_tokens, forward_passes=m.forward_passes, tokens_fed=m.tokens_fed
            )
            for m in usage.models
        ],
        elapsed_ms=usage.elapsed_ms,
        lost_models=usage.lost_models,
    )


def models_to_proto(ensemble: Ensemble) -> coordinator_pb2.ModelsResponse:
    entries = []
    for m in ensemble.members:
        entry = coordinator_pb2.ModelEntry(
            name=m.spec.name,
            priority=m.spec.priority,
            weight=m.weight,
            addresses=sorted(a for a, r in m.replicas.items() if not r.retired),
        )
        if m.info is not None:
            entry.fingerprint = m.info.fingerprint
            entry.vocab_size = m.info.vocab_size
            entry.tokenizer_kind = m.info.tokenizer_kind
            entry.device = m.info.device
        entries.append(entry)
    return coordinator_pb2.ModelsResponse(
        models=entries,
        strategy=ensemble.config.strategy,
        strategies=sorted(STRATEGIES),
        union_vocab_size=ensemble.union.size if ensemble.union is not None else 0,
        ready=ensemble.ready,
    )
