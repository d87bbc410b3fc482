from chorus.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DistributionFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_FORMAT_UNSPECIFIED: _ClassVar[DistributionFormat]
    TOP_K: _ClassVar[DistributionFormat]
    FULL_FP16: _ClassVar[DistributionFormat]
    FULL_FP32: _ClassVar[DistributionFormat]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DISTRIBUTION_FORMAT_UNSPECIFIED: DistributionFormat
TOP_K: DistributionFormat
FULL_FP16: DistributionFormat
FULL_FP32: DistributionFormat
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "vocab_size", "eos_token_ids", "context_length", "tokenizer_kind", "device", "dtype", "active_sessions", "kv_cache_bytes", "queued_feeds", "max_sessions", "kv_block_size", "kv_blocks", "kv_blocks_free", "prefix_cache_hit_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FEEDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    context_length: int
    tokenizer_kind: str
    device: str
    dtype: str
    active_sessions: int
    kv_cache_bytes: int
    queued_feeds: int
    max_sessions: int
    kv_block_size: int
    kv_blocks: int
    kv_blocks_free: int
    prefix_cache_hit_tokens: int
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., context_length: _Optional[int] = ..., tokenizer_kind: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., active_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., queued_feeds: _Optional[int] = ..., max_sessions: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ...) -> None: ...

class VocabularyRequest(_message.Message):
    __slots__ = ("chunk_size",)
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    def __init__(self, chunk_size: _Optional[int] = ...) -> None: ...

class VocabularyChunk(_message.Message):
    __slots__ = ("start_id", "tokens", "special")
    START_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    start_id: int
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    special: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, start_id: _Optional[int] = ..., tokens: _Optional[_Iterable[bytes]] = ..., special: _Optional[_Iterable[bool]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("prompt", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    request_id: str
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("append", "format", "top_k", "rollback", "partial")
    APPEND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    append: bytes
    format: DistributionFormat
    top_k: int
    rollback: int
    partial: bool
    def __init__(self, append: _Optional[bytes] = ..., format: _Optional[_Union[DistributionFormat, str]] = ..., top_k: _Optional[int] = ..., rollback: _Optional[int] = ..., partial: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class SessionDraft(_message.Message):
    __slots__ = ("append", "rollback", "max_tokens", "sampling", "report_top_k", "partial")
    APPEND_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REPORT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    append: bytes
    rollback: int
    max_tokens: int
    sampling: Sampling
    report_top_k: int
    partial: bool
    def __init__(self, append: _Optional[bytes] = ..., rollback: _Optional[int] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., report_top_k: _Optional[int] = ..., partial: _Optional[bool] = ...) -> None: ...

class SessionScore(_message.Message):
    __slots__ = ("append", "rollback", "pieces", "top_k", "partial")
    APPEND_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    append: bytes
    rollback: int
    pieces: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    partial: bool
    def __init__(self, append: _Optional[bytes] = ..., rollback: _Optional[int] = ..., pieces: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ..., partial: _Optional[bool] = ...) -> None: ...

class SessionLookup(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, candidates: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "draft", "score", "lookup")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    step: SessionStep
    draft: SessionDraft
    score: SessionScore
    lookup: SessionLookup
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., step: _Optional[_Union[SessionStep, _Mapping]] = ..., draft: _Optional[_Union[SessionDraft, _Mapping]] = ..., score: _Optional[_Union[SessionScore, _Mapping]] = ..., lookup: _Optional[_Union[SessionLookup, _Mapping]] = ...) -> None: ...

class DistributionPart(_message.Message):
    __slots__ = ("skip_bytes", "log_scale", "ids", "logprobs", "dtype")
    SKIP_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_SCALE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    skip_bytes: int
    log_scale: float
    ids: bytes
    logprobs: bytes
    dtype: DType
    def __init__(self, skip_bytes: _Optional[int] = ..., log_scale: _Optional[float] = ..., ids: _Optional[bytes] = ..., logprobs: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("parts", "tokens_fed", "forward_passes", "batch_size", "queue_ms", "compute_ms", "queue_position")
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[DistributionPart]
    tokens_fed: int
    forward_passes: int
    batch_size: int
    queue_ms: float
    compute_ms: float
    queue_position: int
    def __init__(self, parts: _Optional[_Iterable[_Union[DistributionPart, _Mapping]]] = ..., tokens_fed: _Optional[int] = ..., forward_passes: _Optional[int] = ..., batch_size: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., queue_position: _Optional[int] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("prompt_tokens",)
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ...) -> None: ...

class PositionDistribution(_message.Message):
    __slots__ = ("boundary", "parts")
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    boundary: bool
    parts: _containers.RepeatedCompositeFieldContainer[DistributionPart]
    def __init__(self, boundary: _Optional[bool] = ..., parts: _Optional[_Iterable[_Union[DistributionPart, _Mapping]]] = ...) -> None: ...

class DraftResult(_message.Message):
    __slots__ = ("pieces", "ended", "dists", "tokens_fed", "forward_passes")
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    DISTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    pieces: _containers.RepeatedScalarFieldContainer[bytes]
    ended: bool
    dists: _containers.RepeatedCompositeFieldContainer[PositionDistribution]
    tokens_fed: int
    forward_passes: int
    def __init__(self, pieces: _Optional[_Iterable[bytes]] = ..., ended: _Optional[bool] = ..., dists: _Optional[_Iterable[_Union[PositionDistribution, _Mapping]]] = ..., tokens_fed: _Optional[int] = ..., forward_passes: _Optional[int] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("positions", "tokens_fed", "forward_passes")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedCompositeFieldContainer[PositionDistribution]
    tokens_fed: int
    forward_passes: int
    def __init__(self, positions: _Optional[_Iterable[_Union[PositionDistribution, _Mapping]]] = ..., tokens_fed: _Optional[int] = ..., forward_passes: _Optional[int] = ...) -> None: ...

class LookupResult(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ContextFull(_message.Message):
    __slots__ = ("details",)
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    details: str
    def __init__(self, details: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("opened", "step", "draft", "score", "lookup", "context_full")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FULL_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    step: StepResult
    draft: DraftResult
    score: ScoreResult
    lookup: LookupResult
    context_full: ContextFull
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., step: _Optional[_Union[StepResult, _Mapping]] = ..., draft: _Optional[_Union[DraftResult, _Mapping]] = ..., score: _Optional[_Union[ScoreResult, _Mapping]] = ..., lookup: _Optional[_Union[LookupResult, _Mapping]] = ..., context_full: _Optional[_Union[ContextFull, _Mapping]] = ...) -> None: ...
