"""Protobuf <-> domain for the coordinator's public gRPC API.

A GenerateRequest is read into request_rules' Asked and prompts; the rules themselves (ranges, limits,
roles) are request_rules', which the HTTP front ends (http_models.py) share.
"""

from __future__ import annotations

from typing import Any

from chorus.v1 import common_pb2, coordinator_pb2
from chorus_common.types import Prompt
from coordinator import request_rules
from coordinator.config import EnsembleConfig
from coordinator.ensemble import Ensemble
from coordinator.request_rules import ENSEMBLE_ID as ENSEMBLE_ID  # re-exported: its name in this API
from coordinator.request_rules import InvalidRequest
from coordinator.strategies import STRATEGIES
from coordinator.types import Finished, GenerationRequest, TextPiece, Usage


def requests_from_proto(request: coordinator_pb2.GenerateRequest, config: EnsembleConfig) -> list[GenerationRequest]:
    """One GenerationRequest per conversation of the request."""
    template = (
        request.apply_chat_template if request.HasField("apply_chat_template") else config.defaults.apply_chat_template
    )
    kind = request.WhichOneof("input")
    if kind == "prompt":  # the config's default template is for messages; asked for here, it is refused
        asked_template = request.apply_chat_template if request.HasField("apply_chat_template") else None
        prompts = [request_rules.text_prompt(request.prompt, asked_template)]
    elif kind == "messages":
        prompts = [_conversation(request.messages, template, "messages")]
    elif kind == "batch":
        conversations = request.batch.conversations
        if not conversations:
            raise InvalidRequest("batch.conversations: empty")
        request_rules.check_conversations(len(conversations), config, "batch.conversations")
        prompts = [_conversation(c, template, f"batch.conversations[{i}]") for i, c in enumerate(conversations)]
    else:
        raise InvalidRequest("input: give prompt, messages or batch")
    return request_rules.build_requests(prompts, _asked(request), config)


def _asked(request: coordinator_pb2.GenerateRequest) -> request_rules.Asked:
    def given(field: str) -> Any:  # None: a field the request does not set
        return getattr(request, field) if request.HasField(field) else None

    return request_rules.Asked(
        max_new_tokens=given("max_new_tokens"),
        strategy=request.strategy,
        temperature=given("temperature"),
        top_p=given("top_p"),
        top_k=given("top_k"),
        seed=given("seed"),
        stop=tuple(request.stop),
        threshold=given("threshold"),
        weights=dict(request.weights),
        on_worker_loss=request.on_worker_loss,
        model=request.model,
        request_id=request.request_id,
    )


def _conversation(conv: common_pb2.Conversation, template: bool, field: str) -> Prompt:
    return request_rules.conversation([(m.role, m.content) for m in conv.messages], template, field)


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
