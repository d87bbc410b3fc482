from chorus.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "batch", "max_new_tokens", "strategy", "temperature", "top_p", "top_k", "seed", "stop", "apply_chat_template", "threshold", "request_id", "on_worker_loss", "weights", "model")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ON_WORKER_LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _common_pb2.Conversation
    batch: ConversationBatch
    max_new_tokens: int
    strategy: str
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    apply_chat_template: bool
    threshold: float
    request_id: str
    on_worker_loss: str
    weights: _containers.ScalarMap[str, float]
    model: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., batch: _Optional[_Union[ConversationBatch, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., strategy: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., apply_chat_template: _Optional[bool] = ..., threshold: _Optional[float] = ..., request_id: _Optional[str] = ..., on_worker_loss: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ..., model: _Optional[str] = ...) -> None: ...

class ConversationBatch(_message.Message):
    __slots__ = ("conversations",)
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Conversation]
    def __init__(self, conversations: _Optional[_Iterable[_Union[_common_pb2.Conversation, _Mapping]]] = ...) -> None: ...

class ModelUsage(_message.Message):
    __slots__ = ("name", "prompt_tokens", "forward_passes", "tokens_fed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FED_FIELD_NUMBER: _ClassVar[int]
    name: str
    prompt_tokens: int
    forward_passes: int
    tokens_fed: int
    def __init__(self, name: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., forward_passes: _Optional[int] = ..., tokens_fed: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("completion_tokens", "steps", "steps_ensembled", "models", "elapsed_ms", "lost_models")
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_ENSEMBLED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    LOST_MODELS_FIELD_NUMBER: _ClassVar[int]
    completion_tokens: int
    steps: int
    steps_ensembled: int
    models: _containers.RepeatedCompositeFieldContainer[ModelUsage]
    elapsed_ms: float
    lost_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, completion_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., steps_ensembled: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelUsage, _Mapping]]] = ..., elapsed_ms: _Optional[float] = ..., lost_models: _Optional[_Iterable[str]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("finish_reason", "text", "usage", "request_id")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    text: str
    usage: Usage
    request_id: str
    def __init__(self, finish_reason: _Optional[str] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("index", "text", "done")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    done: Completion
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., done: _Optional[_Union[Completion, _Mapping]] = ...) -> None: ...

class ModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("name", "fingerprint", "vocab_size", "tokenizer_kind", "priority", "weight", "addresses", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_KIND_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    vocab_size: int
    tokenizer_kind: str
    priority: str
    weight: float
    addresses: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_kind: _Optional[str] = ..., priority: _Optional[str] = ..., weight: _Optional[float] = ..., addresses: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class ModelsResponse(_message.Message):
    __slots__ = ("models", "strategy", "strategies", "union_vocab_size", "ready")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    UNION_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    strategy: str
    strategies: _containers.RepeatedScalarFieldContainer[str]
    union_vocab_size: int
    ready: bool
    def __init__(self, models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ..., strategy: _Optional[str] = ..., strategies: _Optional[_Iterable[str]] = ..., union_vocab_size: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...
