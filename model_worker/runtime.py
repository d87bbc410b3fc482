"""The worker's domain: sessions of one model, each with its text and KV cache."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chorus_common.errors import ContextFull
from chorus_common.sampling import pick
from chorus_common.types import DraftResult, Prompt, SamplingParams, ScoreResult, StepResult
from chorus_common.worker_args import WorkerArgs
from model_worker import metrics
from model_worker.conditioning import Conditioner, Plan, TextState
from model_worker.distribution import FULL, Format, Part, build_parts, lookup_logprob
from model_worker.engine import Engine, PassStats
from model_worker.kv_cache import SlotStorage
from model_worker.kv_state import KVState, common_prefix
from model_worker.loading import LoadedModel
from model_worker.token_bytes import token_byte_table, tokenizer_kind

log = logging.getLogger(__name__)

# Vocabularies at least this large have their distributions built off the event loop.
OFF_LOOP_VOCAB = 65536

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request this worker cannot serve; the message names the field."""


class SessionExpired(Exception):
    """The session sat idle past the TTL and its KV cache was reclaimed (FAILED_PRECONDITION)."""


class AtCapacity(Exception):
    """The worker holds its maximum of sessions (RESOURCE_EXHAUSTED: retry later)."""


@dataclass
class Session:
    id: int
    request_id: str
    text: TextState
    kv: KVState
    last_used: float = field(default_factory=time.monotonic)
    expired: bool = False
    last_plan: Plan | None = None  # the plan of the last step, whose output rows are still kept

    @property
    def prompt_tokens(self) -> int:
        return self.text.prompt_len

    @property
    def generated(self) -> bytes:
        return bytes(self.text.generated)


class Runtime:
    def __init__(
        self,
        loaded: LoadedModel,
        max_sessions: int = WorkerArgs.max_sessions,
        kv_budget_bytes: int = 0,
        kv_wait_s: float = WorkerArgs.kv_wait,
        prefill_chunk: int = WorkerArgs.prefill_chunk,
        mix_up_to: int = WorkerArgs.mix_up_to,
    ) -> None:
        self.loaded = loaded
        self.context_length = loaded.context_length  # the slot's size: a session's tokens, prompt included
        # KV storage: one slot of context_length tokens per session. A budget caps the slots; past them,
        # new sessions wait kv_wait_s for one to free, then get RESOURCE_EXHAUSTED.
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model, loaded.dtype, required=bool(kv_budget_bytes))
        slots = max_sessions
        if kv_budget_bytes:
            per_slot = self.kv_bytes_per_token * self.context_length
            slots = min(max_sessions, kv_budget_bytes // per_slot)
            if slots < 1:
                raise ValueError(
                    f"--kv-budget-mib: {kv_budget_bytes / 2**20:.1f} MiB do not hold one session of "
                    f"{self.context_length} tokens ({per_slot / 2**20:.1f} MiB); raise it or lower --max-model-len"
                )
        self.max_sessions = slots
        self.kv_wait_s = kv_wait_s
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.tokens, self.special = token_byte_table(loaded.tokenizer, self.vocab_size)
        self.tokenizer_kind = tokenizer_kind(loaded.tokenizer)
        self.eos_ids = _eos_ids(loaded)
        self._eos = frozenset(self.eos_ids)
        # Specials other than EOS, and empty tokens, are not text: never drawn (as in the union).
        self._not_text = np.array([i not in self._eos and (sp or not b) for i, (b, sp) in
                                   enumerate(zip(self.tokens, self.special, strict=True))])  # fmt: skip
        self.conditioner = Conditioner(loaded.tokenizer, self.tokens, self.special)
        self.storage = SlotStorage(slots, self.context_length, loaded.device)
        self.engine = Engine(loaded.model, loaded.device, self.storage, loaded.name, prefill_chunk, mix_up_to)
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._parts_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distribution")
        self._slot_freed = asyncio.Event()
        # Read at scrape time: nothing on the step path.
        metrics.SESSIONS.labels(loaded.name).set_function(lambda: len(self.sessions))
        metrics.KV_CACHE_BYTES.labels(loaded.name).set_function(self.kv_cache_bytes)
        metrics.KV_USAGE.labels(loaded.name).set_function(self.kv_usage)

    def kv_cached_tokens(self) -> int:
        return sum(len(s.kv.ids) for s in list(self.sessions.values()))

    def kv_cache_bytes(self) -> int:
        """Memory the sessions' cached tokens fill in the storage."""
        return self.kv_cached_tokens() * self.kv_bytes_per_token

    def kv_usage(self) -> float:
        """Cached tokens as a fraction of the storage (every slot's tokens)."""
        return self.kv_cached_tokens() / (self.storage.slots * self.storage.slot_tokens)

    def render(self, prompt: Prompt) -> tuple[str, bool]:
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

    async def open(self, prompt: Prompt, request_id: str = "") -> Session:
        text, add_special = self.render(prompt)
        state = self.conditioner.start(text, add_special)
        if not state.fixed:
            raise RequestError("prompt: empty after tokenization")
        if len(state.fixed) >= self.context_length:
            raise RequestError(
                f"prompt: {len(state.fixed)} tokens do not fit {self.loaded.name}'s context of "
                f"{self.context_length} tokens"
            )
        slot = await self._acquire_slot()
        session = Session(next(self._ids), request_id, state, KVState(slot))
        self.sessions[session.id] = session
        log.debug("session %d opened for request %s (%d prompt tokens)", session.id, request_id, len(state.fixed),
                  extra={"request_id": request_id})  # fmt: skip
        return session

    async def _acquire_slot(self) -> int:
        deadline = time.monotonic() + self.kv_wait_s
        while (slot := self.storage.acquire()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AtCapacity(
                    f"{self.loaded.name}: all {self.storage.slots} KV-cache slots are held by running sessions "
                    f"(waited {self.kv_wait_s:.1f} s); retry later"
                )
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), remaining)
        return slot

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
        if self.sessions.pop(session.id, None) is None:
            return
        log.debug("session %d of request %s closed", session.id, session.request_id,
                  extra={"request_id": session.request_id})  # fmt: skip
        session.kv.truncate(0)
        self.storage.release(session.kv.slot)
        self._slot_freed.set()

    async def step(
        self, session: Session, append: bytes, fmt: Format, rollback: int = 0, partial: bool = False
    ) -> StepResult:
        """Commit `append` (after dropping `rollback` bytes) and return the distribution over the next bytes.
        `partial`: the appended text may end inside a token, so the last one stays open to extension."""
        self._move(session, rollback, append, partial)
        plan = self._plan(session.text)
        stats = await self._ensure_rows(session.kv, session.text, plan, plan.rows_needed)
        session.last_plan = plan
        parts = await self._parts(plan, session.kv.rows, fmt)
        if stats is None:
            return StepResult(parts, 0, 0, 0, 0.0, 0.0)
        return StepResult(parts, stats.tokens_fed, 1, stats.batch_size, stats.queue_ms, stats.compute_ms,
                          stats.queue_position)  # fmt: skip

    async def _parts(self, plan: Plan, rows: dict[int, torch.Tensor], fmt: Format) -> list[Part]:
        """The step's distribution parts; over a large vocabulary in a thread of their own (a softmax and a
        copy of every entry), so the event loop keeps answering other sessions and health checks."""
        if self.vocab_size < OFF_LOOP_VOCAB:
            return build_parts(plan, rows, self.conditioner.index, fmt)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parts_pool, build_parts, plan, dict(rows), self.conditioner.index, fmt)

    async def draft(
        self,
        session: Session,
        append: bytes,
        rollback: int,
        max_tokens: int,
        sampling: SamplingParams,
        seed: int,
        report_top_k: int = 0,
        partial: bool = False,
    ) -> DraftResult:
        """Draw up to max_tokens tokens here, one step each; the session then holds them."""
        if not 1 <= max_tokens <= self.context_length:
            raise RequestError(f"draft.max_tokens: {max_tokens} is outside 1..{self.context_length}")
        rng = np.random.default_rng(seed)
        pieces: list[bytes] = []
        dists: list[list[Part]] = []
        fed = passes = 0
        ended = False
        for _ in range(max_tokens):
            try:
                out = await self.step(session, append, FULL, rollback, partial)
            except ContextFull:
                if not pieces:
                    raise
                break  # the context is full after some tokens: return them; the next call says so
            append, rollback = b"", 0
            fed, passes = fed + out.tokens_fed, passes + out.forward_passes
            plan = session.last_plan
            assert plan is not None
            if report_top_k:
                dists.append(build_parts(plan, session.kv.rows, self.conditioner.index,
                                         Format(report_top_k, FULL.dtype)))  # fmt: skip
            drawn = self._draw(out.parts, sampling, rng)
            if drawn is None:
                ended = True
                break
            token, part = drawn
            piece = self.tokens[token][part.skip_bytes :]
            self.conditioner.commit_draw(session.text, plan, token, part.after_last, piece)
            pieces.append(piece)
        return DraftResult(pieces, ended, dists, fed, passes)

    def _draw(self, parts: list[Part], sampling: SamplingParams, rng: np.random.Generator) -> tuple[int, Part] | None:
        """One token drawn from a step's parts, with the part it came from; None for end of sequence."""
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
        return token, part

    async def score(
        self, session: Session, append: bytes, rollback: int, pieces: list[bytes], top_k: int, partial: bool = False
    ) -> ScoreResult:
        """Distributions before each piece and after the last, in one forward pass; the session keeps the pieces
        (another model's, so re-tokenized canonically). A position inside one of the model's tokens (pending
        bytes) has none."""
        self._move(session, rollback, append, partial)
        state = session.text.copy()
        plans = [self.conditioner.plan(state)]
        for piece in pieces:
            self.conditioner.commit(state, piece, partial=True)
            plans.append(self.conditioner.plan(state))
        # Near the context limit only the first pieces may fit: the positions after them have no distribution
        # (the session still holds every piece; its next step says the context is full).
        fitting = [j for j, p in enumerate(plans) if len(p) < self.context_length]
        if not fitting or fitting[0] != 0:
            raise ContextFull(f"text: {len(plans[0])} tokens reach {self.loaded.name}'s context length")
        last = max(j for j in fitting if all(k in fitting for k in range(j + 1)))
        final = plans[last]
        # A position has a distribution where the model is at a token boundary and its tokens there are
        # a prefix of the final ones (then one pass over the final tokens gives its rows).
        usable = [j <= last and p.at_boundary and p.is_prefix_of(final) for j, p in enumerate(plans)]
        needed = {r for p, ok in zip(plans, usable, strict=True) if ok for r in p.rows_needed}
        stats = await self._ensure_rows(session.kv, state, final, needed)
        session.text = state
        session.last_plan = None
        fmt = Format(top_k, FULL.dtype)
        index = self.conditioner.index
        positions = [build_parts(p, session.kv.rows, index, fmt) if ok else None
                     for p, ok in zip(plans, usable, strict=True)]  # fmt: skip
        if stats is None:
            return ScoreResult(positions, 0, 0)
        return ScoreResult(positions, stats.tokens_fed, 1)

    def lookup(self, session: Session, candidates: list[bytes]) -> list[float]:
        """Log-probabilities of candidate continuations under the last step's distribution."""
        if session.last_plan is None:
            raise RequestError("lookup: no step to look up in (send a step first)")
        plan, rows = session.last_plan, session.kv.rows
        return [lookup_logprob(plan, rows, self.conditioner, self._eos, c) for c in candidates]

    def _move(self, session: Session, rollback: int, append: bytes, partial: bool = False) -> None:
        """Drop `rollback` bytes from the end of the session's text, then append."""
        if session.expired:
            raise SessionExpired(f"session {session.id} was idle too long and its KV cache was reclaimed")
        session.last_used = time.monotonic()
        text = session.text
        if rollback > len(text.generated):
            raise RequestError(f"rollback: {rollback} bytes, but the session holds {len(text.generated)}")
        if rollback:
            self.conditioner.rollback(text, rollback)
        if append:
            row = session.kv.rows.get(len(text.fixed) - 1) if not text.tail else None
            self.conditioner.commit(text, append, row, partial)

    def _plan(self, text: TextState) -> Plan:
        plan = self.conditioner.plan(text)
        if len(plan) >= self.context_length:
            raise ContextFull(f"text: {len(plan)} tokens reach {self.loaded.name}'s context length")
        return plan

    async def _ensure_rows(self, kv: KVState, text: TextState, plan: Plan, needed: Collection[int]) -> PassStats | None:
        """Make the cache hold the plan's tokens with the output rows at the `needed` positions: one feed at
        most, over the tokens that changed (and back to the earliest missing row). Only tokens after the
        text's low-water mark are compared: the cost does not grow with the text."""
        stable = min(text.low_water, len(kv.ids), len(plan))
        kv.truncate(stable + common_prefix(kv.ids[stable:], plan.suffix(stable)))
        missing = [p for p in needed if p not in kv.rows]
        if missing:
            kv.truncate(min(min(missing), len(kv.ids)))
        new = plan.suffix(len(kv.ids))
        stats = await self.engine.forward(kv, new, needed) if new else None
        kv.keep_rows(set(needed))
        text.mark()
        if stats is None:
            return None
        metrics.TOKENS_FED.labels(self.loaded.name).observe(stats.tokens_fed)
        return stats


def kv_bytes_per_token(model: Any, dtype: torch.dtype, required: bool = True) -> int:
    """Keys and values of one token over every layer, from the model's config (0 if it cannot tell and
    nothing requires it)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except AttributeError as exc:
        if not required:
            return 0
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
