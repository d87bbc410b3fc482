"""Which replica of a model serves a request: the one most likely to hold its prompt's prefix in its KV
cache (llm-d's prefix-aware routing), unless that one is busier than the least loaded by a margin.

The coordinator has no tokenizer, so the key is the prompt's leading bytes: requests that begin alike
(a shared system prompt, a few-shot preamble, earlier turns of a chat) get the same key. Rendezvous
(highest-random-weight) hashing maps a key to a replica so that adding or removing a replica moves only
the keys it wins or held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from chorus_common.types import Prompt

# Leading bytes of a prompt that decide its replica: a few KV blocks' worth of text, counted in whole
# chunks, so that short prompts sharing their beginning (a preamble, then a question) share a key.
PREFIX_BYTES = 256
CHUNK_BYTES = 64
# The prefix's replica is skipped when it serves this many more requests than the least loaded one.
MAX_IMBALANCE = 4


class Loaded(Protocol):
    active: int


def prefix_key(prompt: Prompt) -> bytes:
    """The prompt's first whole CHUNK_BYTES chunks, at most PREFIX_BYTES bytes, as the model sees them
    (messages in order, roles included). A prompt shorter than a chunk has the empty key: such prompts
    share little cache, and the imbalance rule spreads them when they pile up."""
    if prompt.text is not None:
        data = prompt.text.encode()
    else:
        data = b"".join(role.encode() + b"\0" + content.encode() + b"\0" for role, content in prompt.messages)
    return data[: min(PREFIX_BYTES, len(data) // CHUNK_BYTES * CHUNK_BYTES)]


def _weight(key: bytes, address: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + address.encode(), digest_size=8).digest()


def choose(replicas: Sequence[tuple[str, Loaded]], key: bytes | None) -> int:
    """Index of the replica for a request with this prefix key (None: the least loaded)."""
    least = min(range(len(replicas)), key=lambda i: replicas[i][1].active)
    if key is None or len(replicas) == 1:  # (the empty key is a key: short prompts meet on one replica)
        return least
    best = max(range(len(replicas)), key=lambda i: _weight(key, replicas[i][0]))
    if replicas[best][1].active - replicas[least][1].active >= MAX_IMBALANCE:
        return least
    return best
