"""A slow, independent GaC reference: no KV cache, no index arrays, no batching.

Each step recomputes every model from scratch on the tokens its conditioning rules give (the
worker's Conditioner decides *which* tokens, and is tested on its own against full re-encodes),
applies token healing by brute force over the vocabulary, averages distributions keyed by bytes in
plain dicts, and takes the argmax. The served cluster must produce the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_worker.conditioning import Conditioner, Plan, TextState
from model_worker.token_bytes import token_byte_table
from tests.plans import plan_ids

END = None  # the pooled end-of-sequence entry


class ReferenceModel:
    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        size = self.model.get_output_embeddings().weight.shape[0]
        self.tokens, self.special = token_byte_table(self.tokenizer, size)
        self.eos = {self.tokenizer.eos_token_id}
        self.conditioner = Conditioner(self.tokenizer, self.tokens, self.special)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def start(self, prompt: str) -> TextState:
        return self.conditioner.start(prompt, True)

    def commit(self, state: TextState, piece: bytes, partial: bool = False) -> None:
        row = self._logprobs(state.fixed) if not state.tail else None
        self.conditioner.commit(state, piece, row, partial)

    @staticmethod
    def _goes_on(plan: Plan, data: bytes) -> bool:
        """Inside a character spelt with tokens, only a token that continues it (a continuation byte) can follow."""
        return bool(plan.pending) or not plan.inside or 0x80 <= data[0] < 0xC0

    def next_bytes(self, state: TextState) -> dict[bytes | None, float]:
        plan = self.conditioner.plan(state)
        ids, pending = plan_ids(plan), plan.pending
        dist: dict[bytes | None, float] = {}

        def add(key: bytes | None, p: float) -> None:
            dist[key] = dist.get(key, 0.0) + p

        scale = 1.0
        for j, prefix in enumerate(plan.levels):  # a token in place of the last k tokens extends their bytes
            k = plan.open - j
            before = self._logprobs(ids[:-k])
            for t, b in enumerate(self.tokens):
                if not self.special[t] and b.startswith(prefix) and len(b) > len(prefix):
                    add(b[len(prefix) :], scale * math.exp(before[t]))
            if k == 1 and plan.alt is not None:  # the run spelt as before a word: its tokens, then a word's
                weight = scale
                for i, token in enumerate(plan.alt.tokens):
                    weight *= math.exp(self._logprobs(ids[:-1] + list(plan.alt.tokens[:i]))[token])
                via = self._logprobs(ids[:-1] + list(plan.alt.tokens))
                rest = plan.alt.rest
                for t, b in enumerate(self.tokens):
                    if t in self.eos:
                        if not rest:
                            add(END, weight * math.exp(via[t]))
                    elif not self.special[t] and b.startswith(rest) and len(b) > len(rest):
                        add(b[len(rest) :], weight * math.exp(via[t]))
            scale *= math.exp(before[ids[-k]])
        after = self._logprobs(ids)
        for t, b in enumerate(self.tokens):
            p = scale * math.exp(after[t])
            if t in self.eos:
                if not pending and not plan.inside:  # committed bytes of a split character must be continued
                    add(END, p)
            elif self.special[t] or not b.startswith(pending) or len(b) <= len(pending) or not self._goes_on(plan, b):
                continue
            else:
                add(b[len(pending) :], p)
        return dist


def reference_generate(models: list[ReferenceModel], prompt: str, max_new_tokens: int) -> str:
    """Greedy GaC with equal weights. A model that gave the chosen entry less than half the probability
    the mix gave it did not write it: it receives the text as partial (re-tokenized, healed)."""
    states = [m.start(prompt) for m in models]
    generated = b""
    for _ in range(max_new_tokens):
        # Each model's softmax as it is (the mass of special tokens other than the end is dropped, not
        # spread), averaged; shares of the chosen entry are normalised, within a model and within the mix.
        dists = [model.next_bytes(state) for model, state in zip(models, states, strict=True)]
        mixed: dict[bytes | None, float] = {}
        for dist in dists:
            for key, p in dist.items():
                mixed[key] = mixed.get(key, 0.0) + p / len(models)
        choice = max(mixed, key=lambda k: mixed[k])
        if choice is END:
            break
        generated += choice
        share = mixed[choice] / sum(mixed.values())
        for model, state, dist in zip(models, states, dists, strict=True):
            model.commit(state, choice, partial=dist.get(choice, 0.0) / sum(dist.values()) < 0.5 * share)
    return generated.decode("utf-8", errors="replace")


def text_bytes_of_ids(table: list[bytes], ids: Iterable[int]) -> bytes:
    """The bytes a sequence of ids spells (special tokens included as their display bytes)."""
    return b"".join(table[i] for i in ids)
