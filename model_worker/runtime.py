"""The worker's domain: sessions of one model, each with its text and KV cache."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from model_worker import metrics
from model_worker.batching import Batcher
from model_worker.conditioning import Conditioner
from model_worker.distribution import Format, Part, build_parts
from model_worker.kv_state import KVState, common_prefix
from model_worker.loading import LoadedModel
from model_worker.token_bytes import token_byte_table, tokenizer_kind

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request this worker cannot serve; the message names the field."""


class ContextFull(RequestError):
    """The text no longer fits the model's context."""


class SessionExpired(Exception):
    """The session sat idle past the TTL and its KV cache was reclaimed (FAILED_PRECONDITION)."""


class AtCapacity(Exception):
    """The worker holds its maximum of sessions (RESOURCE_EXHAUSTED: retry later)."""


@dataclass(frozen=True)
class PromptSpec:
    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    apply_chat_template: bool = False


@dataclass
class Session:
    id: int
    request_id: str
    prompt: str
    add_special_tokens: bool
    prompt_tokens: int
    generated: bytearray = field(default_factory=bytearray)
    kv: KVState = field(default_factory=KVState)
    last_used: float = field(default_factory=time.monotonic)
    expired: bool = False


@dataclass(frozen=True)
class StepOutput:
    parts: list[Part]
    tokens_fed: int
    forward_passes: int
    batch_size: int
    queue_ms: float
    compute_ms: float


class Runtime:
    def __init__(self, loaded: LoadedModel, max_sessions: int = 1024) -> None:
        self.loaded = loaded
        self.max_sessions = max_sessions
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.tokens, self.special = token_byte_table(loaded.tokenizer, self.vocab_size)
        self.tokenizer_kind = tokenizer_kind(loaded.tokenizer)
        self.eos_ids = _eos_ids(loaded)
        self.conditioner = Conditioner(loaded.tokenizer, self.tokens, self.special)
        self.batcher = Batcher(loaded.model, loaded.device, loaded.name)
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        # Read at scrape time: nothing on the step path.
        metrics.SESSIONS.labels(loaded.name).set_function(lambda: len(self.sessions))
        metrics.KV_CACHE_BYTES.labels(loaded.name).set_function(self.kv_cache_bytes)

    def kv_cache_bytes(self) -> int:
        return sum(s.kv.nbytes() for s in list(self.sessions.values()))

    def render(self, prompt: PromptSpec) -> tuple[str, bool]:
        """The prompt as text, and whether the tokenizer should add its special tokens."""
        if prompt.text is not None:
            return prompt.text, True
        for i, (role, _) in enumerate(prompt.messages):
            if role not in ROLES:
                raise RequestError(f"messages[{i}].role: unknown role {role!r}, expected one of {ROLES}")
        if not prompt.messages:
            raise RequestError("prompt: neither text nor messages given")
        tokenizer = self.loaded.tokenizer
        if prompt.apply_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": r, "content": c} for r, c in prompt.messages]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        lines = "".join(f"{role}: {content}\n" for role, content in prompt.messages)
        return lines + "assistant: ", True

    def open(self, prompt: PromptSpec, request_id: str = "") -> Session:
        if len(self.sessions) >= self.max_sessions:
            raise AtCapacity(f"{self.loaded.name}: {len(self.sessions)} sessions open, the most it holds; retry later")
        text, add_special = self.render(prompt)
        ids = self.conditioner.encode(text, add_special)
        if not ids:
            raise RequestError("prompt: empty after tokenization")
        if len(ids) >= self.loaded.context_length:
            raise RequestError(
                f"prompt: {len(ids)} tokens do not fit {self.loaded.name}'s context of "
                f"{self.loaded.context_length} tokens"
            )
        session = Session(next(self._ids), request_id, text, add_special, len(ids))
        self.sessions[session.id] = session
        log.debug("session %d opened for request %s (%d prompt tokens)", session.id, request_id, len(ids),
                  extra={"request_id": request_id})  # fmt: skip
        return session

    def reap(self, ttl: float) -> int:
        """Close sessions idle for more than ttl seconds (a client that holds a stream but never steps)."""
        cutoff = time.monotonic() - ttl
        idle = [s for s in self.sessions.values() if s.last_used < cutoff]
        for session in idle:
            session.expired = True
            self.close(session)
        if idle:
            log.warning("reclaimed %d sessions idle for more than %.0f s", len(idle), ttl)
        return len(idle)

    def close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        log.debug("session %d of request %s closed", session.id, session.request_id,
                  extra={"request_id": session.request_id})  # fmt: skip
        session.kv = KVState()

    async def step(self, session: Session, append: bytes, fmt: Format) -> StepOutput:
        """Commit `append` and return the distribution over the next bytes."""
        if session.expired:
            raise SessionExpired(f"session {session.id} was idle too long and its KV cache was reclaimed")
        session.last_used = time.monotonic()
        session.generated += append
        plan = self.conditioner.plan(session.prompt, session.add_special_tokens, bytes(session.generated))
        if len(plan.ids) >= self.loaded.context_length:
            raise ContextFull(f"text: {len(plan.ids)} tokens reach {self.loaded.name}'s context length")
        kv = session.kv
        kv.truncate(common_prefix(kv.ids, plan.ids))
        missing = [p for p in plan.rows_needed if p not in kv.rows]
        stats = None
        if missing:
            kv.truncate(min(missing))
            stats = await self.batcher.forward(kv, plan.ids[len(kv.ids) :])
            metrics.TOKENS_FED.labels(self.loaded.name).observe(stats.tokens_fed)
        parts = build_parts(plan, kv.rows, self.conditioner.index, fmt)
        if stats is None:
            return StepOutput(parts, 0, 0, 0, 0.0, 0.0)
        return StepOutput(parts, stats.tokens_fed, 1, stats.batch_size, stats.queue_ms, stats.compute_ms)


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)
