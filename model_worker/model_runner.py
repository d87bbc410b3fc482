"""Runs one pass of a transformers model over the paged KV cache: packs the slices' tokens into one row,
tells attention where each session's keys are (paged_attention.py), and returns the wanted output rows.

Two forms:
- ragged (any mix of decodes and prefill chunks): shapes change from pass to pass;
- static decode (every slice one token): the batch is padded to a bucket size and the block tables to a
  bucket width, so a pass of a given bucket always has the same shapes. On CUDA each bucket is captured
  once as a CUDA graph and replayed (no per-layer kernel launches from Python); elsewhere it runs eagerly,
  the same code (tests run it on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_worker import metrics, paged_attention, vocab_projection
from model_worker.conditioning import Branch, branch_rows
from model_worker.kv_manager import KVManager
from model_worker.paged_attention import GatheredDecodes, PassCache, PassPlan, SeqAttention
from model_worker.pass_clock import PassClock
from model_worker.scheduler import Slice

log = logging.getLogger(__name__)

# On a CPU, decodes whose context is at most this many positions are attended as one gathered batch (the
# copy is cheap there, and one batched product beats a product per session); longer ones read their blocks
# in place. On a GPU every decode is gathered: the copy costs little next to a dozen kernel launches per
# session and layer (on an H200, attending decodes past 256 tokens one by one made a 16-session step of an
# 8B model 2.8-3.0x a StaticCache forward: docs/bench-gpu.md).
GATHER_UP_TO = 256
# The gathered batch copies each session's blocks (padded to the longest) for one layer at a time: at most
# this many bytes of keys and values, so that many long sessions decoding together cannot ask for more
# memory than the KV pool leaves (past it, the rest are attended in place, one by one).
GATHER_BYTES = 512 << 20
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
TOKEN_BUCKETS = (1, 2, 4, 8)  # tokens per session in the static form (scheduler.SHORT: short feeds go first)
# Block-table widths of the static form: powers of two up to WIDTH_STEP blocks, then multiples of a step
# that grows with the width (WIDTH_STEP, or a quarter of the width's power of two past 64 blocks): a context
# pads by less than WIDTH_STEP blocks or a quarter of itself, and up to 512 blocks there are 20 widths, not 36.
WIDTH_STEP = 16
# At most this many CUDA graphs per worker (each holds its own kernel launch list and static inputs); a
# shape met after that runs eagerly.
MAX_GRAPHS = 256


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


def _width(blocks: int) -> int:
    if blocks <= WIDTH_STEP:
        return 1 << (blocks - 1).bit_length()
    step = max(WIDTH_STEP, 1 << (blocks.bit_length() - 3))
    return -(-blocks // step) * step


# An output row: after the token at a position, or after a branch's tokens from a position on.
RowKey = int | Branch


@dataclass(frozen=True)
class PassInput:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    plan: PassPlan
    keep: torch.Tensor  # packed indices whose logits are wanted, in order
    wanted: list[list[RowKey]]  # per slice: its wanted positions, then its branches, in `keep` order


class ModelRunner:
    def __init__(
        self, model: Any, kv: KVManager, device: torch.device, cuda_graphs: bool = False, name: str = "model"
    ) -> None:
        self.model = model
        self.name = name
        self.kv = kv
        self.device = device
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layers = int(config.num_hidden_layers)
        self.group_of = kv.layout.group_of()
        self.gather_up_to = GATHER_UP_TO if device.type == "cpu" else None  # None: every decode
        # B x M x block_size of a gathered batch, at most.
        self.gather_positions = max(kv.block_size, GATHER_BYTES // kv.layout.layer_bytes_per_token)
        model.set_attn_implementation(paged_attention.NAME)
        vocab_projection.few_rows(model)  # CPU float32: a few rows' logits at one row's cost
        self.static = StaticDecoder(self, cuda_graphs=cuda_graphs and device.type == "cuda")
        self.clock = PassClock(device, name)

    # ------------------------------------------------------------------ ragged passes

    def prepare(self, slices: list[Slice]) -> PassInput:
        bs = self.kv.block_size
        gather_up_to = self.gather_up_to
        groups = self.kv.layout.groups
        ids: list[int] = []
        positions: list[int] = []
        write: list[list[int]] = [[] for _ in groups]
        seqs: list[SeqAttention] = []
        gathered: list[tuple[list[list[int | None]], int, int]] = []  # (tables, start, tokens) of gathered decodes
        gathered_rows: list[int] = []  # their packed rows
        widest = 0  # the most blocks a gathered decode reads
        keep: list[int] = []
        wanted: list[list[RowKey]] = []
        for s in slices:
            q0, n = len(ids), len(s.tokens)
            # Branch tokens go after the slice's tokens, at their own positions; their keys and values are
            # written to the scratch position (attention reads them from the pass itself, not the storage).
            forks = [(at + i, token) for at, tokens in s.branches for i, token in enumerate(tokens)]
            ids += s.tokens + [token for _, token in forks]
            positions += [*range(s.start, s.start + n), *(p for p, _ in forks)]
            tables = s.feed.kv.tables
            for g in range(len(groups)):
                table = tables[g]
                write[g] += [table[p // bs] * bs + p % bs for p in range(s.start, s.start + n)]  # type: ignore[operator]
                write[g] += [0] * len(forks)
            end = s.start + n
            keep += [q0 + p - s.start for p in s.want] + [q0 + n + j for j in range(len(forks))]
            wanted.append([*s.want, *(row for branch in s.branches for row in branch_rows(branch))])
            blocks = max(widest, -(-end // bs))
            if (
                n == 1
                and (gather_up_to is None or end <= gather_up_to)
                and not forks
                and (len(gathered) + 1) * blocks * bs <= self.gather_positions
            ):
                gathered.append((tables, s.start, 1))
                gathered_rows.append(q0)
                widest = blocks
                continue
            runs, masks = [], []
            for g, group in enumerate(groups):
                first = 0 if group.window is None else max(0, s.start - group.window + 1)
                runs.append(_runs(tables[g], first, end, bs))
                masks.append(_mask(s.start, n, first, end, group.window, self.device, s.branches))
            seqs.append(SeqAttention(q0, n + len(forks), runs, masks, len(forks)))
        dev = self.device
        plan = PassPlan(
            bs,
            self.group_of,
            self.kv.keys,
            self.kv.values,
            [torch.tensor(w, dtype=torch.long, device=dev) for w in write],
            seqs,
            _gather(gathered, gathered_rows, groups, bs, dev) if gathered else None,
        )
        return PassInput(
            torch.tensor([ids], dtype=torch.long, device=dev),
            torch.tensor([positions], dtype=torch.long, device=dev),
            plan,
            torch.tensor(keep, dtype=torch.long, device=dev),
            wanted,
        )

    @torch.inference_mode()
    def run(self, slices: list[Slice]) -> list[dict[RowKey, torch.Tensor]]:
        """One pass; per slice, its wanted positions' and branches' output logits (float32)."""
        self.clock.begin()
        shape = self.static.shape_of(slices)
        if shape is not None:
            rows = self.static.run(slices, shape)
        else:
            batch = self.prepare(slices)
            self.clock.mark("prepare")
            logits = self.forward(batch.input_ids, batch.position_ids, batch.plan, batch.keep)[0]
            self.clock.mark("forward")
            rows = _split_rows(logits, batch.wanted)
        self.clock.end()
        return rows

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, plan: PassPlan, keep: Any) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=paged_attention.NO_MASK,
            cache=PassCache(plan, self.layers),
            use_cache=True,
            logits_to_keep=keep,
            chorus_pass=plan,
        )
        return out.logits


def _split_rows(logits: torch.Tensor, wanted: list[list[RowKey]]) -> list[dict[RowKey, torch.Tensor]]:
    rows = logits.float()
    out, i = [], 0
    for positions in wanted:
        out.append({p: rows[i + j].clone() for j, p in enumerate(positions)})
        i += len(positions)
    return out


def _runs(table: list[int | None], first: int, end: int, bs: int) -> list[tuple[int, int]]:
    """Storage runs (start, length) holding positions [first, end) of a block table, adjacent blocks merged."""
    runs: list[tuple[int, int]] = []
    p = first
    while p < end:
        block = table[p // bs]
        assert block is not None, "a position attention needs was released"
        at = block * bs + p % bs
        m = min(end, (p // bs + 1) * bs) - p
        if runs and runs[-1][0] + runs[-1][1] == at:
            runs[-1] = (runs[-1][0], runs[-1][1] + m)
        else:
            runs.append((at, m))
        p += m
    return runs


def _mask(
    start: int, n: int, first: int, end: int, window: int | None, device: torch.device, branches: Sequence[Branch] = ()
) -> torch.Tensor | None:
    """[n + b, end - first + b]: key position k visible to query position q iff k <= q (and k > q - window).
    The b branch tokens' queries follow the n, and their own keys follow the stored ones: a branch from
    position p sees the stored keys before p and its own tokens up to itself; no other query sees them."""
    if n == 1 and not branches:
        return None  # one query sees every key of its range
    q = torch.arange(start, start + n, device=device)[:, None]
    k = torch.arange(first, end, device=device)[None, :]
    seen = k <= q
    if window is not None:
        seen &= k > q - window
    if not branches:
        return seen
    b = sum(len(tokens) for _, tokens in branches)
    rows = [torch.cat([seen, torch.zeros(n, b, dtype=torch.bool, device=device)], 1)]
    col = 0
    for at, tokens in branches:
        length = len(tokens)
        fork = torch.arange(at, at + length, device=device)[:, None]
        stored = k < at  # the positions it stands in for, and those after, are not its own
        if window is not None:
            stored = stored & (k > fork - window)
        own = torch.zeros(length, b, dtype=torch.bool, device=device)
        own[:, col : col + length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        rows.append(torch.cat([stored.expand(length, -1), own], 1))
        col += length
    return torch.cat(rows, 0)


def _gather(
    seqs: list[tuple[list[list[int | None]], int, int]],
    rows: list[int],
    groups: Any,
    bs: int,
    device: torch.device,
    batch: int | None = None,
    width: int | None = None,
    tokens: int = 1,
) -> GatheredDecodes:
    """Storage positions [B * M * bs] and additive masks [B, N, M * bs] of sessions whose n <= N = `tokens`
    queries sit at positions start .. start + n - 1 (per session: block tables, start, n), padded to `batch`
    sessions and `width` blocks; `rows` are the B * N queries' packed rows, session by session. A padding
    query (past a session's n, or of a padding session) sees column 0 alone (its output is dropped). A
    sliding group gathers only the blocks its windows span, so a long context costs it no more than a short
    one."""
    batch = batch or len(seqs)
    width = width or max(-(-(start + n) // bs) for _, start, n in seqs)
    starts = torch.tensor([start for _, start, _ in seqs] + [0] * (batch - len(seqs)), dtype=torch.long)
    counts = torch.tensor([n for _, _, n in seqs] + [0] * (batch - len(seqs)), dtype=torch.long)
    query = starts[:, None] + torch.arange(tokens)  # [B, N] each query's position
    real = torch.arange(tokens) < counts[:, None]  # [B, N] not padding
    positions_out, bias_out = [], []
    for g, group in enumerate(groups):
        window = group.window
        m = width if window is None else min(width, -(-(window + tokens - 1) // bs) + 1)
        # Per session, the first block read (column 0 holds its first position) and that many blocks on.
        firsts = [0 if window is None else max(0, start - window + 1) // bs for _, start, _ in seqs]
        rows_of = [
            [b if b is not None else 0 for b in tables_of[g][first : -(-(start + n) // bs)]]
            for (tables_of, start, n), first in zip(seqs, firsts, strict=True)
        ]
        tables = torch.tensor([r + [0] * (m - len(r)) for r in rows_of] + [[0] * m] * (batch - len(seqs)))
        column = torch.tensor(firsts + [0] * (batch - len(seqs)))[:, None] * bs + torch.arange(m * bs)  # [B, M*bs]
        lowest = torch.zeros_like(query) if window is None else (query - window + 1).clamp(min=0)
        visible = (column[:, None, :] <= query[:, :, None]) & (column[:, None, :] >= lowest[:, :, None])
        visible &= real[:, :, None]
        visible[:, :, 0] |= ~real  # a padding query sees column 0 alone
        positions = (tables[:, :, None] * bs + torch.arange(bs)).view(-1)
        bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        positions_out.append(positions.to(device))
        bias_out.append(bias.to(device))
    return GatheredDecodes(torch.tensor(rows, dtype=torch.long).to(device), positions_out, bias_out)


class StaticDecoder:
    """Passes of short feeds only (decodes, catch-ups and re-tokenized pieces of up to TOKEN_BUCKETS[-1]
    tokens, no branches), with bucketed shapes: sessions padded to BATCH_BUCKETS, tokens per session to
    TOKEN_BUCKETS, block tables to `_width`. Padding tokens (token 0 at position 0) write to the storage's
    scratch position (block 0's first, which `KVManager` never hands out) and their rows are dropped. With
    CUDA graphs, each (batch, tokens, width) bucket is captured on first use and replayed after; all of them
    share one memory pool (passes run one at a time, and each pass's rows are copied out before the next),
    as vLLM's do."""

    def __init__(self, runner: ModelRunner, cuda_graphs: bool, enabled: bool | None = None) -> None:
        self.runner = runner
        self.cuda_graphs = cuda_graphs
        self.enabled = cuda_graphs if enabled is None else enabled
        self._graphs: dict[tuple[int, int, int], _Captured] = {}
        self.pool: Any = None  # the graphs' shared memory pool, made at the first capture
        self._said_full = False

    @property
    def captured(self) -> int:
        """How many buckets run as CUDA graphs (0 off CUDA, or after a capture failed)."""
        return len(self._graphs) if self.cuda_graphs else 0

    def shape_of(self, slices: list[Slice]) -> tuple[int, int, int] | None:
        """The pass's bucket (sessions, tokens per session, block-table width) if the static form takes it:
        short feeds without branches, whose gathered batch stays within the runner's bound; else None."""
        if not (
            self.enabled
            and bool(slices)
            and all(
                1 <= len(s.tokens) <= TOKEN_BUCKETS[-1]
                and not s.branches
                and all(s.start <= p < s.start + len(s.tokens) for p in s.want)
                for s in slices
            )
        ):
            return None
        bs = self.runner.kv.block_size
        batch = _bucket(len(slices), BATCH_BUCKETS)
        tokens = _bucket(max(len(s.tokens) for s in slices), TOKEN_BUCKETS)
        width = _width(max(-(-(s.start + len(s.tokens)) // bs) for s in slices))
        return (batch, tokens, width) if batch * width * bs <= self.runner.gather_positions else None

    def inputs(self, slices: list[Slice], batch: int, tokens: int, width: int) -> tuple[torch.Tensor, ...]:
        """input_ids, position_ids [1, batch * tokens] (session by session); per group the write positions
        [batch * tokens]; and the gather."""
        runner, bs = self.runner, self.runner.kv.block_size
        groups = runner.kv.layout.groups
        ids, positions = [0] * (batch * tokens), [0] * (batch * tokens)
        write = [[0] * (batch * tokens) for _ in groups]
        for i, s in enumerate(slices):
            for j, token in enumerate(s.tokens):
                at, p = i * tokens + j, s.start + j
                ids[at], positions[at] = token, p
                for g in range(len(groups)):
                    write[g][at] = s.feed.kv.tables[g][p // bs] * bs + p % bs  # type: ignore[operator]
        seqs = [(s.feed.kv.tables, s.start, len(s.tokens)) for s in slices]
        gathered = _gather(seqs, list(range(batch * tokens)), groups, bs, runner.device, batch, width, tokens)
        dev = runner.device
        return (
            torch.tensor([ids], device=dev),
            torch.tensor([positions], device=dev),
            *(torch.tensor(w, dtype=torch.long, device=dev) for w in write),
            *gathered.positions,
            *gathered.bias,
            gathered.rows,
        )

    def _plan(self, tensors: tuple[torch.Tensor, ...]) -> PassPlan:
        runner = self.runner
        n = len(runner.kv.layout.groups)
        write = list(tensors[2 : 2 + n])
        positions = list(tensors[2 + n : 2 + 2 * n])
        bias = list(tensors[2 + 2 * n : 2 + 3 * n])
        rows = tensors[2 + 3 * n]
        return PassPlan(
            runner.kv.block_size,
            runner.group_of,
            runner.kv.keys,
            runner.kv.values,
            write,
            [],
            GatheredDecodes(rows, positions, bias),
        )

    def run(self, slices: list[Slice], key: tuple[int, int, int]) -> list[dict[RowKey, torch.Tensor]]:
        """One pass of these slices in the bucket `shape_of` gave them."""
        batch, tokens, width = key
        clock = self.runner.clock
        tensors = self.inputs(slices, batch, tokens, width)
        clock.mark("prepare")
        captured = self._graphs.get(key) if self.cuda_graphs else None
        if self.cuda_graphs and captured is None and len(self._graphs) >= MAX_GRAPHS:
            if not self._said_full:
                log.warning("%d CUDA graphs captured: passes of shapes not yet seen run eagerly", MAX_GRAPHS)
                self._said_full = True
        elif self.cuda_graphs and captured is None:
            try:
                captured = self._graphs[key] = _Captured.capture(self, tensors)
                metrics.GRAPH_CAPTURES.labels(self.runner.name).inc()
                log.info("captured a CUDA graph: %d sessions of %d tokens, %d blocks wide", *key)
            except Exception:  # a model whose forward cannot be captured still serves, without graphs
                log.exception("capturing a CUDA graph failed: short passes run eagerly from now on")
                self.cuda_graphs = False
        if captured is not None:
            logits = captured.replay(tensors)
        else:
            logits = self.runner.forward(tensors[0], tensors[1], self._plan(tensors), 0)[0]
        clock.mark("forward")
        keep = [i * tokens + p - s.start for i, s in enumerate(slices) for p in s.want]
        return _split_rows(logits[torch.tensor(keep, dtype=torch.long, device=logits.device)], [s.want for s in slices])


class _Captured:
    """One bucket's CUDA graph: static input tensors, copied into before each replay."""

    def __init__(self, graph: Any, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> None:
        self.graph, self.inputs, self.logits = graph, inputs, logits

    @staticmethod
    def capture(decoder: StaticDecoder, example: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.clone() for t in example)
        runner = decoder.runner
        plan = decoder._plan(static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as torch.cuda.graphs requires
            for _ in range(2):
                runner.forward(static[0], static[1], plan, 0)
        torch.cuda.current_stream().wait_stream(stream)
        if decoder.pool is None:
            decoder.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=decoder.pool):
            logits = runner.forward(static[0], static[1], plan, 0)[0]
        return _Captured(graph, static, logits)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.logits
