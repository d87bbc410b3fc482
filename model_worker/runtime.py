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

import numpy as np
import torch

from chorus_common.errors import ContextFull
from chorus_common.sampling import pick
from chorus_common.types import DraftResult, Prompt, SamplingParams, ScoreResult, StepResult
from chorus_common.worker_args import WorkerArgs
from model_worker import metrics
from model_worker.backend import Backend, SessionCache
from model_worker.conditioning import Branch, Conditioner, Plan, TextState, branch_rows
from model_worker.distribution import FULL, Format, Part, build_parts, lookup_logprob
from model_worker.engine import Engine
from model_worker.errors import AtCapacity, RequestError, SessionExpired
from model_worker.host_memory import memory_left
from model_worker.kv_layout import KVLayout
from model_worker.kv_manager import KVManager
from model_worker.loading import LoadedModel
from model_worker.model_runner import BATCH_BUCKETS, GATHER_BYTES, TOKEN_BUCKETS
from model_worker.scheduler import PassStats
from model_worker.token_bytes import token_byte_table, tokenizer_kind

log = logging.getLogger(__name__)

# The KV pool on CPU when no budget is given (vLLM's CPU default), and at most this share of the memory the
# host (or the container's limit) still leaves after loading: the rest is for activations and buffers, and
# for the other processes there (every worker reads the same memory left).
CPU_KV_BUDGET = 4 << 30
CPU_KV_SHARE = 0.5
# Vocabularies at least this large have their distributions built off the event loop.
OFF_LOOP_VOCAB = 65536

ROLES = ("system", "user", "assistant")


@dataclass
class Session:
    id: int
    request_id: str
    text: TextState
    kv: SessionCache
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
        max_batched_tokens: int = WorkerArgs.max_batched_tokens,
        block_size: int = WorkerArgs.block_size,
        prefix_caching: bool = WorkerArgs.prefix_caching,
        cuda_graphs: bool = WorkerArgs.cuda_graphs,
        decode_stretch: float = WorkerArgs.decode_stretch,
    ) -> None:
        self.loaded = loaded
        self.context_length = loaded.context_length  # a session's tokens, prompt included
        layout = KVLayout.of(loaded.model.config, loaded.dtype)
        self.kv_bytes_per_token = layout.bytes_per_token
        vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
        budget = kv_budget_bytes or auto_kv_budget(
            loaded.device, layout, max_sessions, self.context_length, vocab=vocab
        )
        # KV storage: a pool of blocks; sessions hold the blocks their tokens fill. Past max_sessions, or when
        # the blocks free cannot hold a new prompt, new sessions wait kv_wait_s, then get RESOURCE_EXHAUSTED.
        kv = KVManager(layout, budget, max_sessions, self.context_length, block_size, loaded.device, prefix_caching)
        log.info("KV pool: %.0f MiB (%s)", budget / 2**20, "--kv-budget-mib" if kv_budget_bytes else "auto")
        self.max_sessions = max_sessions
        self.kv_wait_s = kv_wait_s
        self.vocab_size = vocab
        self.tokens, self.special = token_byte_table(loaded.tokenizer, self.vocab_size)
        self.tokenizer_kind = tokenizer_kind(loaded.tokenizer)
        self.eos_ids = _eos_ids(loaded)
        self._eos = frozenset(self.eos_ids)
        # Specials other than EOS, and empty tokens, are not text: never drawn (as in the union).
        self._not_text = np.array(
            [
                i not in self._eos and (sp or not b)
                for i, (b, sp) in enumerate(zip(self.tokens, self.special, strict=True))
            ]
        )
        self.conditioner = Conditioner(loaded.tokenizer, self.tokens, self.special)
        self.engine: Backend = Engine(
            loaded.model,
            loaded.device,
            kv,
            loaded.name,
            max_batched_tokens,
            prefill_chunk,
            kv_wait_s,
            cuda_graphs,
            decode_stretch,
        )
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._parts_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distribution")
        # Read at scrape time: nothing on the step path.
        metrics.SESSIONS.labels(loaded.name).set_function(lambda: len(self.sessions))
        metrics.KV_CACHE_BYTES.labels(loaded.name).set_function(self.kv_cache_bytes)
        metrics.KV_CACHED_BYTES.labels(loaded.name).set_function(lambda: self.engine.report().cached_bytes)
        metrics.KV_USAGE.labels(loaded.name).set_function(lambda: self.engine.report().usage)

    def kv_cache_bytes(self) -> int:
        """Memory of the KV blocks the sessions hold."""
        return self.engine.report().held_bytes

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
        kv = await self._admit(state.fixed)
        session = Session(next(self._ids), request_id, state, kv)
        self.sessions[session.id] = session
        log.debug(
            "session %d opened for request %s (%d prompt tokens)",
            session.id,
            request_id,
            len(state.fixed),
            extra={"request_id": request_id},
        )
        return session

    async def _admit(self, prompt: list[int]) -> SessionCache:
        """A new session's cache; waits kv_wait_s for a session to end or for KV memory to free, then AtCapacity."""
        deadline = time.monotonic() + self.kv_wait_s
        while True:
            cache = self.engine.new_cache(prompt) if len(self.sessions) < self.max_sessions else None
            if cache is not None:
                return cache
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                held = len(self.sessions) >= self.max_sessions
                why = (
                    f"all {self.max_sessions} sessions are held"
                    if held
                    else f"the KV blocks free do not hold a prompt of {len(prompt)} tokens"
                )
                raise AtCapacity(f"{self.loaded.name}: {why} (waited {self.kv_wait_s:.1f} s); retry later")
            self.engine.blocks_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.blocks_freed.wait(), remaining)

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
        log.debug(
            "session %d of request %s closed", session.id, session.request_id, extra={"request_id": session.request_id}
        )
        self.engine.release(session.kv)

    async def step(
        self, session: Session, append: bytes, fmt: Format, rollback: int = 0, partial: bool = False
    ) -> StepResult:
        """Commit `append` (after dropping `rollback` bytes) and return the distribution over the next bytes.
        `partial`: the appended text may end inside a token, so the last one stays open to extension."""
        return await self._step(session, append, fmt, rollback, partial, self.vocab_size >= OFF_LOOP_VOCAB)

    async def _step(
        self,
        session: Session,
        append: bytes,
        fmt: Format,
        rollback: int,
        partial: bool,
        off_loop: bool,
        with_parts: bool = True,
    ) -> StepResult:
        """`with_parts=False`: the rows only (the result's parts are left empty, for the caller to build)."""
        self._move(session, rollback, append, partial)
        plan = self._plan(session.text)
        stats = await self._ensure_rows(session.kv, session.text, plan, plan.rows_needed, self._branches([plan]))
        session.last_plan = plan
        parts = await self._parts(plan, session.kv, fmt, off_loop) if with_parts else []
        if stats is None:
            return StepResult(parts, 0, 0, 0, 0.0, 0.0)
        return StepResult(
            parts, stats.tokens_fed, 1, stats.batch_size, stats.queue_ms, stats.compute_ms, stats.queue_position
        )

    async def _parts(self, plan: Plan, kv: SessionCache, fmt: Format, off_loop: bool) -> list[Part]:
        """The step's distribution parts; `off_loop`, in a thread of their own (over a large vocabulary a
        step's parts are a softmax and a copy of every entry for the wire), so the event loop keeps answering
        other sessions and health checks."""
        index = self.conditioner.index
        if not off_loop:
            return build_parts(plan, kv.rows, index, fmt, kv.branch_rows)
        loop = asyncio.get_running_loop()
        rows, branches = dict(kv.rows), dict(kv.branch_rows)
        return await loop.run_in_executor(self._parts_pool, build_parts, plan, rows, index, fmt, branches)

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
                # The rows only: the draw below builds the parts it needs, on the loop (a hand-off to the parts
                # thread per token cost more than the softmax: bench_engine.draft_host_time, Gemma 3, 32 sessions).
                out = await self._step(session, append, FULL, rollback, partial, off_loop=False, with_parts=False)
            except ContextFull:
                if not pieces:
                    raise
                break  # the context is full after some tokens: return them; the next call says so
            append, rollback = b"", 0
            fed, passes = fed + out.tokens_fed, passes + out.forward_passes
            plan = session.last_plan
            assert plan is not None
            kv = session.kv
            if report_top_k:
                fmt = Format(report_top_k, FULL.dtype)
                dists.append(build_parts(plan, kv.rows, self.conditioner.index, fmt, kv.branch_rows))
            drawn = self._draw_after(plan, kv, sampling, rng)
            if drawn is None:
                ended = True
                break
            token, skip, replaces = drawn
            piece = self.tokens[token][skip:]
            self.conditioner.commit_draw(session.text, plan, token, replaces, piece)
            pieces.append(piece)
        return DraftResult(pieces, ended, dists, fed, passes)

    def _draw_after(
        self, plan: Plan, kv: SessionCache, sampling: SamplingParams, rng: np.random.Generator
    ) -> tuple[int, int, int] | None:
        """A draft's next token after the plan: (token, bytes of it already committed, tokens it replaces), or
        None for end of sequence. Greedy, where the text ends on a token boundary, the draw is the top of the last
        row itself (`_greedy_token`) and no distribution is built (a softmax over the vocabulary and, on a GPU,
        its copy to the host: the largest part of a drafting worker's host time per token)."""
        if sampling.temperature == 0 and not (plan.levels or plan.pending or plan.inside):  # one dense part
            token = self._greedy_token(kv.rows[len(plan) - 1])
            return None if token in self._eos else (token, 0, 0)
        parts = build_parts(plan, kv.rows, self.conditioner.index, FULL, kv.branch_rows)
        drawn = self._draw(parts, sampling, rng)
        return None if drawn is None else (drawn[0], drawn[1].skip_bytes, drawn[1].replaces)

    def _greedy_token(self, row: torch.Tensor) -> int:
        """The likeliest text token after a row of logits: what `_likeliest` picks from the row's one dense
        part (log-softmax keeps the order; `argmax` takes the first of equals, as NumPy's does), read off the
        logits as transformers' greedy `generate` reads them."""
        # On a CPU NumPy's argmax (vectorised: 22 us over 262,144 floats) beats torch's (370 us, more than the
        # softmax it replaces); on a GPU only the index crosses to the host.
        i = int(row.argmax()) if row.device.type != "cpu" else int(np.argmax(row.numpy()))
        if self._not_text[i]:  # rare: the top is a special token; the top of the rest
            i = int(np.argmax(np.where(self._not_text, -np.inf, row.float().cpu().numpy())))
        return i

    def _draw(self, parts: list[Part], sampling: SamplingParams, rng: np.random.Generator) -> tuple[int, Part] | None:
        """One token drawn from a step's parts, with the part it came from; None for end of sequence."""
        # A model draws after the text's own spelling only: a draw after the other spelling of a trailing run
        # (Plan.alt) would re-spell the run behind the committed text, and the byte rollbacks that follow a
        # rejected draft then leave other tokens than a shorter draft's did (fixed 5- and 1-token SAFE drafts
        # stopped writing the same text, tests/test_real_strategies.py). Its distribution still counts both.
        parts = [part for part in parts if part.replaces >= 0]
        k, offset = self._likeliest(parts) if sampling.temperature == 0 else self._sampled(parts, sampling, rng)
        part = parts[k]
        token = offset if part.ids is None else int(part.ids[offset])
        if part.ids is None and token in self._eos:
            return None
        return token, part

    def _sampled(self, parts: list[Part], sampling: SamplingParams, rng: np.random.Generator) -> tuple[int, int]:
        """The part and the offset in it of an entry drawn from the parts' probabilities concatenated (specials
        of the full vocabulary masked)."""
        logps = []
        for part in parts:
            logp = part.logprobs.astype(np.float64) + part.log_scale
            if part.ids is None:
                logp[self._not_text] = -np.inf
            logps.append(logp)
        index = pick(np.exp(np.concatenate(logps)), sampling, rng)
        starts = np.cumsum([0] + [lp.size for lp in logps])
        k = int(np.searchsorted(starts, index, side="right")) - 1
        return k, index - int(starts[k])

    def _likeliest(self, parts: list[Part]) -> tuple[int, int]:
        """Greedy: the part and the offset in it of the likeliest text entry, the one `pick` finds over the
        parts' probabilities concatenated (the first of equals), compared in log space. exp is increasing, and
        float32 log-probabilities that differ, plus one part's scale, stay apart in float64, so the choice is the
        same (across parts, two entries within float64 rounding of each other could tie after exp, where the
        earlier part won; here the larger does) without an exp and a float64 copy of the vocabulary per token:
        that was half the worker's host time per drawn token at 262,144 tokens, time the other sessions of the
        next pass wait (bench_engine.py, `draft_host_time`)."""
        best, where = -np.inf, (0, 0)
        for k, part in enumerate(parts):
            logp = part.logprobs
            if logp.size == 0:
                continue
            i = int(np.argmax(logp))
            if part.ids is None and self._not_text[i]:  # rare: the top is a special token; the top of the rest
                i = int(np.argmax(np.where(self._not_text, -np.inf, logp)))
            value = float(logp[i]) + part.log_scale
            if value > best:
                best, where = value, (k, i)
        return where

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
        branches = self._branches([p for p, ok in zip(plans, usable, strict=True) if ok])
        stats = await self._ensure_rows(session.kv, state, final, needed, branches)
        session.text = state
        session.last_plan = None
        fmt = Format(top_k, FULL.dtype)
        index, kv = self.conditioner.index, session.kv
        positions = [
            build_parts(p, kv.rows, index, fmt, kv.branch_rows) if ok else None
            for p, ok in zip(plans, usable, strict=True)
        ]
        if stats is None:
            return ScoreResult(positions, 0, 0)
        return ScoreResult(positions, stats.tokens_fed, 1)

    def lookup(self, session: Session, candidates: list[bytes]) -> list[float]:
        """Log-probabilities of candidate continuations under the last step's distribution."""
        if session.last_plan is None:
            raise RequestError("lookup: no step to look up in (send a step first)")
        plan, kv = session.last_plan, session.kv
        return [lookup_logprob(plan, kv.rows, self.conditioner, self._eos, c, kv.branch_rows) for c in candidates]

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

    def _branches(self, plans: list[Plan]) -> list[Branch]:
        """The branches the plans' alternative spellings need, where their positions fit in the context (past
        it, a plan is read in its first spelling only)."""
        fitting = []
        for plan in plans:
            branch = plan.branch
            if branch is not None and branch[0] + len(branch[1]) <= self.context_length:
                fitting.append(branch)
        return fitting

    def _plan(self, text: TextState) -> Plan:
        plan = self.conditioner.plan(text)
        if len(plan) >= self.context_length:
            raise ContextFull(f"text: {len(plan)} tokens reach {self.loaded.name}'s context length")
        return plan

    async def _ensure_rows(
        self, kv: SessionCache, text: TextState, plan: Plan, needed: Collection[int], branches: Collection[Branch] = ()
    ) -> PassStats | None:
        """Make the cache hold the plan's tokens with the output rows at the `needed` positions and the
        `branches`: one feed at most, over the tokens that changed (and back to the earliest missing row; a
        branch rides with the token at its position). Only tokens after the text's low-water mark are
        compared: the cost does not grow with the text."""
        stable = min(text.low_water, len(kv.ids), len(plan))
        self.engine.truncate(kv, stable + common_prefix(kv.ids[stable:], plan.suffix(stable)))
        forks = {row for branch in branches for row in branch_rows(branch)}
        missing = [p for p in needed if p not in kv.rows] + [at for at, _ in forks if (at, _) not in kv.branch_rows]
        if missing:
            self.engine.truncate(kv, min(min(missing), len(kv.ids)))
        new = plan.suffix(len(kv.ids))
        stats = await self.engine.forward(kv, new, needed, branches) if new else None
        kv.keep_rows(set(needed), forks)
        text.mark()
        if stats is None:
            return None
        metrics.TOKENS_FED.labels(self.loaded.name).observe(stats.tokens_fed)
        return stats


def gpu_pass_reserve(layout: KVLayout, vocab: int) -> int:
    """Bytes a GPU keeps free beside the KV pool for the largest pass: a gathered batch (GATHER_BYTES) and the
    output rows of the largest static pass (BATCH_BUCKETS[-1] sessions of TOKEN_BUCKETS[-1] tokens over the
    vocabulary: in the model's dtype, the rows picked out of them, and those in float32)."""
    rows = BATCH_BUCKETS[-1] * TOKEN_BUCKETS[-1]
    return GATHER_BYTES + rows * vocab * (2 * layout.dtype.itemsize + 4)


def auto_kv_budget(
    device: torch.device,
    layout: KVLayout,
    sessions: int,
    context: int,
    left: int | None = None,
    vocab: int = 0,
) -> int:
    """The KV pool's bytes when no budget is given: on CUDA 90% of the memory free after loading, less what
    its largest pass needs (`gpu_pass_reserve`); elsewhere 4 GiB (vLLM's CPU backend's default KV space), but
    no more than half of the memory the host or the container's limit still leaves (`left`, read when not
    given): its pages become resident as blocks are used, and the prefix cache keeps using them. At least one
    full context, at most `sessions` of them."""
    most = sessions * context * layout.bytes_per_token
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.9) - gpu_pass_reserve(layout, vocab)
    else:
        left = memory_left() if left is None else left
        budget = CPU_KV_BUDGET if left is None else min(CPU_KV_BUDGET, int(left * CPU_KV_SHARE))
    return max(min(budget, most), context * layout.bytes_per_token + 2**20)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)
