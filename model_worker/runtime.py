"""The worker's domain: sessions of one model, each with its text and KV cache."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coordinator.sampling import pick
from coordinator.types import SamplingParams
from model_worker import metrics
from model_worker.batching import Batcher, PassStats
from model_worker.conditioning import Conditioner, Plan
from model_worker.distribution import FULL, Format, Part, build_parts, dense_part, lookup_logprob
from model_worker.kv_state import ROWS_KEPT, KVState, common_prefix
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
    last_plan: Plan | None = None  # the plan of the last step, whose output rows are still kept


@dataclass(frozen=True)
class StepOutput:
    parts: list[Part]
    tokens_fed: int
    forward_passes: int
    batch_size: int
    queue_ms: float
    compute_ms: float


@dataclass(frozen=True)
class DraftOutput:
    pieces: list[bytes]  # one per drawn token
    ended: bool  # an end-of-sequence token was drawn after the pieces
    dists: list[list[Part]]  # with report_top_k: the distribution of every draw
    tokens_fed: int
    forward_passes: int


@dataclass(frozen=True)
class ScoreOutput:
    positions: list[list[Part] | None]  # before each piece and after the last; None = no token boundary
    tokens_fed: int
    forward_passes: int


class Runtime:
    def __init__(
        self, loaded: LoadedModel, max_sessions: int = 1024, kv_budget_bytes: int = 0, kv_wait_s: float = 5.0
    ) -> None:
        self.loaded = loaded
        self.max_sessions = max_sessions
        # KV-cache budget (0 = none): a pass that would exceed it waits for others to free theirs,
        # then fails with RESOURCE_EXHAUSTED, rather than run the process out of memory.
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_wait_s = kv_wait_s
        # Only needed with a budget; a config this formula does not fit then fails at start, clearly.
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model, loaded.dtype) if kv_budget_bytes else 0
        self._kv_reserved = 0  # tokens being fed by passes in flight
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.tokens, self.special = token_byte_table(loaded.tokenizer, self.vocab_size)
        self.tokenizer_kind = tokenizer_kind(loaded.tokenizer)
        self.eos_ids = _eos_ids(loaded)
        self._eos = frozenset(self.eos_ids)
        # Specials other than EOS, and empty tokens, are not text: never drawn (as in the union).
        self._not_text = np.array([i not in self._eos and (sp or not b) for i, (b, sp) in
                                   enumerate(zip(self.tokens, self.special, strict=True))])  # fmt: skip
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

    async def step(self, session: Session, append: bytes, fmt: Format, rollback: int = 0) -> StepOutput:
        """Commit `append` (after dropping `rollback` bytes) and return the distribution over the next bytes."""
        self._move(session, rollback, append)
        plan = self._plan(session, bytes(session.generated))
        stats = await self._ensure_rows(session.kv, plan.ids, plan.rows_needed)
        session.last_plan = plan
        parts = build_parts(plan, session.kv.rows, self.conditioner.index, fmt)
        if stats is None:
            return StepOutput(parts, 0, 0, 0, 0.0, 0.0)
        return StepOutput(parts, stats.tokens_fed, 1, stats.batch_size, stats.queue_ms, stats.compute_ms)

    async def draft(
        self,
        session: Session,
        append: bytes,
        rollback: int,
        max_tokens: int,
        sampling: SamplingParams,
        seed: int,
        report_top_k: int = 0,
    ) -> DraftOutput:
        """Draw up to max_tokens tokens here, one step each; the session then holds them."""
        if not 1 <= max_tokens <= self.loaded.context_length:
            raise RequestError(f"draft.max_tokens: {max_tokens} is outside 1..{self.loaded.context_length}")
        rng = np.random.default_rng(seed)
        pieces: list[bytes] = []
        dists: list[list[Part]] = []
        fed = passes = 0
        ended = False
        for _ in range(max_tokens):
            out = await self.step(session, append, FULL, rollback)
            rollback = 0
            fed, passes = fed + out.tokens_fed, passes + out.forward_passes
            if report_top_k:
                assert session.last_plan is not None
                dists.append(build_parts(session.last_plan, session.kv.rows, self.conditioner.index,
                                         Format(report_top_k, FULL.dtype)))  # fmt: skip
            piece = self._draw(out.parts, sampling, rng)
            if piece is None:
                ended = True
                break
            pieces.append(piece)
            append = piece
        if not ended:
            session.generated += append  # held; the next message feeds it
        return DraftOutput(pieces, ended, dists, fed, passes)

    def _draw(self, parts: list[Part], sampling: SamplingParams, rng: np.random.Generator) -> bytes | None:
        """One continuation drawn from a step's parts: its bytes, or None for end of sequence."""
        logps = []
        for part in parts:
            logp = part.logprobs.astype(np.float64) + part.log_scale
            if part.ids is None:
                logp[self._not_text] = -np.inf
            logps.append(logp)
        index = pick(np.exp(np.concatenate(logps)), sampling, rng)
        starts = np.cumsum([0] + [lp.size for lp in logps])
        k = int(np.searchsorted(starts, index, side="right")) - 1
        part, offset = parts[k], index - int(starts[k])
        token = offset if part.ids is None else int(part.ids[offset])
        if part.ids is None and token in self._eos:
            return None
        return self.tokens[token][part.skip_bytes :]

    async def score(
        self, session: Session, append: bytes, rollback: int, pieces: list[bytes], top_k: int
    ) -> ScoreOutput:
        """Distributions before each piece and after the last, in one forward pass; the session keeps the pieces."""
        self._move(session, rollback, append)
        text = bytes(session.generated) + b"".join(pieces)
        plan = self._plan(session, text)
        # Where tokens end, counted in bytes from the end of the text (robust to BOS and SentencePiece's
        # dummy prefix at the start).
        suffixes = [sum(len(p) for p in pieces[j:]) for j in range(len(pieces) + 1)]
        token_at: dict[int, int] = {}
        tail = len(plan.pending)
        for t in range(len(plan.ids) - 1, -1, -1):
            token_at.setdefault(tail, t)
            tail += len(self.tokens[plan.ids[t]])
            if tail > suffixes[0]:
                break
        rows = [token_at.get(s) for s in suffixes]
        stats = await self._ensure_rows(session.kv, plan.ids, {r for r in rows if r is not None})
        session.generated = bytearray(text)
        session.last_plan = None
        fmt = Format(top_k, FULL.dtype)
        positions = [
            None if r is None else [dense_part(torch.log_softmax(session.kv.rows[r].float(), -1), 0.0, fmt)]
            for r in rows
        ]
        if stats is None:
            return ScoreOutput(positions, 0, 0)
        return ScoreOutput(positions, stats.tokens_fed, 1)

    def lookup(self, session: Session, candidates: list[bytes]) -> list[float]:
        """Log-probabilities of candidate continuations under the last step's distribution."""
        if session.last_plan is None:
            raise RequestError("lookup: no step to look up in (send a step first)")
        plan, rows = session.last_plan, session.kv.rows
        return [lookup_logprob(plan, rows, self.conditioner, self._eos, c) for c in candidates]

    def _move(self, session: Session, rollback: int, append: bytes) -> None:
        """Drop `rollback` bytes from the end of the session's text, then append."""
        if session.expired:
            raise SessionExpired(f"session {session.id} was idle too long and its KV cache was reclaimed")
        session.last_used = time.monotonic()
        if rollback > len(session.generated):
            raise RequestError(f"rollback: {rollback} bytes, but the session holds {len(session.generated)}")
        if rollback:
            del session.generated[-rollback:]
        session.generated += append

    def _plan(self, session: Session, generated: bytes) -> Plan:
        plan = self.conditioner.plan(session.prompt, session.add_special_tokens, generated)
        if len(plan.ids) >= self.loaded.context_length:
            raise ContextFull(f"text: {len(plan.ids)} tokens reach {self.loaded.name}'s context length")
        return plan

    async def _ensure_rows(self, kv: KVState, ids: list[int], needed: Collection[int]) -> PassStats | None:
        """Make the cache hold ids with the output rows at `needed` positions: one forward pass at most,
        over the tokens that changed (and back to the earliest missing row)."""
        kv.truncate(common_prefix(kv.ids, ids))
        missing = [p for p in needed if p not in kv.rows]
        if not missing:
            return None
        first = min(missing)
        # Rows already there before `first` survive the pass (extend keeps only the newest rows).
        kept = {p: kv.rows[p] for p in needed if p < first and p in kv.rows}
        kv.truncate(first)
        new = ids[len(kv.ids) :]
        await self._reserve(len(ids), len(new))
        try:
            stats = await self.batcher.forward(kv, new, rows=max(ROWS_KEPT, len(ids) - first))
        finally:
            self._kv_reserved -= len(new)
        kv.rows.update(kept)
        metrics.TOKENS_FED.labels(self.loaded.name).observe(stats.tokens_fed)
        return stats

    async def _reserve(self, total: int, new: int) -> None:
        """Wait until `new` more cached tokens fit the KV budget (a session of `total` tokens)."""
        if not self.kv_budget_bytes:
            return
        budget = self.kv_budget_bytes // self.kv_bytes_per_token  # in tokens
        if total > budget:
            raise AtCapacity(f"{self.loaded.name}: {total} tokens need more KV cache than its budget of {budget}")
        deadline = time.monotonic() + self.kv_wait_s
        while sum(len(s.kv.ids) for s in self.sessions.values()) + self._kv_reserved + new > budget:
            if time.monotonic() > deadline:
                raise AtCapacity(f"{self.loaded.name}: KV-cache budget full ({budget} tokens); retry later")
            await asyncio.sleep(0.01)
        self._kv_reserved += new


def kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer, from the model's config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except AttributeError as exc:
        raise ValueError(f"--kv-budget-mib: cannot size this model's KV cache from its config ({exc})") from exc
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)
