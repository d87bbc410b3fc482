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

from model_worker import paged_attention, vocab_projection
from model_worker.conditioning import Branch, branch_rows
from model_worker.kv_manager import KVManager
from model_worker.paged_attention import GatheredDecodes, PassCache, PassPlan, SeqAttention
from model_worker.scheduler import Slice

log = logging.getLogger(__name__)

# Decodes whose context is at most this many positions are attended as one gathered batch (the copy is
# cheap there, and one batched product beats a product per session); longer ones read their blocks in place.
GATHER_UP_TO = 256
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


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
    def __init__(self, model: Any, kv: KVManager, device: torch.device, cuda_graphs: bool = False) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layers = int(config.num_hidden_layers)
        self.group_of = kv.layout.group_of()
        model.set_attn_implementation(paged_attention.NAME)
        vocab_projection.few_rows(model)  # CPU float32: a few rows' logits at one row's cost
        self.static = StaticDecoder(self, cuda_graphs=cuda_graphs and device.type == "cuda")

    # ------------------------------------------------------------------ ragged passes

    def prepare(self, slices: list[Slice], gather_up_to: int = GATHER_UP_TO) -> PassInput:
        bs = self.kv.block_size
        groups = self.kv.layout.groups
        ids: list[int] = []
        positions: list[int] = []
        write: list[list[int]] = [[] for _ in groups]
        seqs: list[SeqAttention] = []
        gathered: list[tuple[int, list[list[int | None]], int]] = []  # (packed row, tables, length)
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
            if n == 1 and end <= gather_up_to and not forks:
                gathered.append((q0, tables, end))
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
            _gather(gathered, groups, bs, dev) if gathered else None,
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
        if self.static.accepts(slices):
            return self.static.run(slices)
        batch = self.prepare(slices)
        logits = self.forward(batch.input_ids, batch.position_ids, batch.plan, batch.keep)[0]
        return _split_rows(logits, batch.wanted)

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
    rows: list[tuple[int, list[list[int | None]], int]],
    groups: Any,
    bs: int,
    device: torch.device,
    batch: int | None = None,
    width: int | None = None,
) -> GatheredDecodes:
    """Storage positions [B * M * bs] and additive masks [B, M * bs] of decodes (a token at position
    length - 1 each), padded to `batch` rows and `width` blocks (padding rows see the scratch block 0)."""
    batch = batch or len(rows)
    width = width or max(-(-length // bs) for _, _, length in rows)
    positions_out, bias_out = [], []
    for g, group in enumerate(groups):
        tables = torch.zeros(batch, width, dtype=torch.long)
        visible = torch.zeros(batch, width * bs, dtype=torch.bool)
        visible[len(rows) :, 0] = True
        for i, (_, tables_of, length) in enumerate(rows):
            table = tables_of[g][: -(-length // bs)]
            tables[i, : len(table)] = torch.tensor([b if b is not None else 0 for b in table], dtype=torch.long)
            lo = 0 if group.window is None else max(0, length - group.window)
            visible[i, lo:length] = True
        positions = (tables[:, :, None] * bs + torch.arange(bs)).view(-1)
        bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
        positions_out.append(positions.to(device))
        bias_out.append(bias.to(device))
    packed = torch.tensor([q for q, _, _ in rows], dtype=torch.long)
    if batch > len(rows):
        packed = torch.cat([packed, torch.arange(len(rows), batch)])
    return GatheredDecodes(packed.to(device), positions_out, bias_out)


class StaticDecoder:
    """Decode-only passes with bucketed shapes: batch padded to BATCH_BUCKETS, block tables to a power of
    two. Padding rows decode token 0 at position 0 into the storage's scratch position (block 0's first,
    which `KVManager` never hands out) and are dropped. With CUDA graphs, each (batch, width) bucket is
    captured on first use and replayed after."""

    def __init__(self, runner: ModelRunner, cuda_graphs: bool, enabled: bool | None = None) -> None:
        self.runner = runner
        self.cuda_graphs = cuda_graphs
        self.enabled = cuda_graphs if enabled is None else enabled
        self._graphs: dict[tuple[int, int], _Captured] = {}

    @property
    def captured(self) -> int:
        """How many buckets run as CUDA graphs (0 off CUDA, or after a capture failed)."""
        return len(self._graphs) if self.cuda_graphs else 0

    def accepts(self, slices: list[Slice]) -> bool:
        return (
            self.enabled
            and bool(slices)
            and all(len(s.tokens) == 1 and s.want == [s.start] and not s.branches for s in slices)
        )

    def shapes(self, slices: list[Slice]) -> tuple[int, int]:
        bs = self.runner.kv.block_size
        batch = _bucket(len(slices), BATCH_BUCKETS)
        blocks = max(-(-(s.start + 1) // bs) for s in slices)
        width = 1 << (blocks - 1).bit_length()
        return batch, width

    def inputs(self, slices: list[Slice], batch: int, width: int) -> tuple[torch.Tensor, ...]:
        """input_ids, position_ids [1, batch]; per group the write positions [batch]; and the gather."""
        runner, bs = self.runner, self.runner.kv.block_size
        groups = runner.kv.layout.groups
        pad = batch - len(slices)
        ids = [s.tokens[0] for s in slices] + [0] * pad
        positions = [s.start for s in slices] + [0] * pad
        write = [
            [s.feed.kv.tables[g][s.start // bs] * bs + s.start % bs for s in slices] + [0] * pad  # type: ignore[operator]
            for g in range(len(groups))
        ]
        gathered = _gather(
            [(i, s.feed.kv.tables, s.start + 1) for i, s in enumerate(slices)], groups, bs, runner.device, batch, width
        )
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

    def run(self, slices: list[Slice]) -> list[dict[RowKey, torch.Tensor]]:
        batch, width = self.shapes(slices)
        tensors = self.inputs(slices, batch, width)
        captured = self._graphs.get((batch, width)) if self.cuda_graphs else None
        if self.cuda_graphs and captured is None:
            try:
                captured = self._graphs[(batch, width)] = _Captured.capture(self, tensors)
            except Exception:  # a model whose forward cannot be captured still serves, without graphs
                log.exception("capturing a CUDA graph failed: decode-only passes run eagerly from now on")
                self.cuda_graphs = False
        if captured is not None:
            logits = captured.replay(tensors)
        else:
            logits = self.runner.forward(tensors[0], tensors[1], self._plan(tensors), 0)[0]
        return _split_rows(logits[: len(slices)], [[s.start] for s in slices])


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
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = runner.forward(static[0], static[1], plan, 0)[0]
        log.info("captured a CUDA graph for a decode batch of %d", static[0].shape[1])
        return _Captured(graph, static, logits)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.logits
