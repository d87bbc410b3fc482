"""A slow, independent GaC reference: no KV cache, no index arrays, no batching.

Each step recomputes every model from scratch on its canonical tokenization, applies token
healing by brute force over the vocabulary, averages distributions keyed by bytes in plain
dicts, and takes the argmax. The served cluster must produce the same text.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_worker.conditioning import split_utf8
from model_worker.token_bytes import token_byte_table

END = None  # the pooled end-of-sequence entry


class ReferenceModel:
    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        size = self.model.get_output_embeddings().weight.shape[0]
        self.tokens, self.special = token_byte_table(self.tokenizer, size)
        self.eos = {self.tokenizer.eos_token_id}

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def next_bytes(self, prompt: str, generated: bytes) -> dict[bytes | None, float]:
        valid, pending = split_utf8(generated)
        text = prompt + valid.decode("utf-8", errors="replace")
        text_bytes = text.encode() + pending
        ids = self.tokenizer(text)["input_ids"]
        singles = {b[0]: i for i, b in reversed(list(enumerate(self.tokens))) if len(b) == 1 and not self.special[i]}
        if pending and all(b in singles for b in pending):
            ids += [singles[b] for b in pending]
            pending = b""
        dist: dict[bytes | None, float] = {}

        def add(key: bytes | None, p: float) -> None:
            dist[key] = dist.get(key, 0.0) + p

        scale = 1.0
        last = self.tokens[ids[-1]]
        prefix = last + pending
        extending = [
            t
            for t, b in enumerate(self.tokens)
            if not self.special[t] and b.startswith(prefix) and len(b) > len(prefix)
        ]
        healing = (
            len(ids) >= 2
            and not self.special[ids[-1]]
            and last != b""
            and text_bytes[: len(text_bytes) - len(pending)].endswith(last)
            and (pending or extending)
        )
        if healing:
            before = self._logprobs(ids[:-1])
            for t in extending:
                add(self.tokens[t][len(prefix) :], math.exp(before[t]))
            scale = math.exp(before[ids[-1]])
        after = self._logprobs(ids)
        for t, b in enumerate(self.tokens):
            p = scale * math.exp(after[t])
            if t in self.eos:
                if not pending:  # committed bytes of a split character must be continued
                    add(END, p)
            elif self.special[t] or not b.startswith(pending) or len(b) <= len(pending):
                continue
            else:
                add(b[len(pending) :], p)
        return dist


def reference_generate(models: list[ReferenceModel], prompt: str, max_new_tokens: int) -> str:
    """Greedy GaC with equal weights."""
    generated = b""
    for _ in range(max_new_tokens):
        mixed: dict[bytes | None, float] = {}
        for model in models:
            for key, p in model.next_bytes(prompt, generated).items():
                mixed[key] = mixed.get(key, 0.0) + p / len(models)
        choice = max(mixed, key=lambda k: mixed[k])
        if choice is END:
            break
        generated += choice
    return generated.decode("utf-8", errors="replace")
