"""The ensemble a coordinator serves: connected workers, their vocabularies and the union."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from coordinator.config import EnsembleConfig, ModelSpec
from coordinator.types import WorkerInfo
from coordinator.union_vocab import ModelVocab, UnionVocab
from coordinator.workers import Transport, WorkerClient

log = logging.getLogger(__name__)


@dataclass
class Member:
    spec: ModelSpec
    client: WorkerClient
    info: WorkerInfo
    vocab: ModelVocab
    weight: float
    index: np.ndarray  # model token id -> union id (-1: not text)


@dataclass
class Ensemble:
    config: EnsembleConfig
    members: list[Member]
    union: UnionVocab
    transport: Transport

    @property
    def primary(self) -> int | None:
        return self.config.primary_index

    async def close(self) -> None:
        await asyncio.gather(*(m.client.close() for m in self.members))


async def connect(config: EnsembleConfig, addresses: list[str], timeout: float = 600.0) -> Ensemble:
    """Connect to one worker per model (in config order) and build the union vocabulary."""
    clients = [WorkerClient(a) for a in addresses]
    await asyncio.gather(*(c.wait_ready(timeout) for c in clients))
    infos = await asyncio.gather(*(c.info() for c in clients))
    vocabs = await asyncio.gather(*(c.vocabulary(i) for c, i in zip(clients, infos, strict=True)))
    union = UnionVocab(vocabs)
    weights = config.weight_vector()
    members = [
        Member(spec, client, info, vocab, weight, union.index[i])
        for i, (spec, client, info, vocab, weight) in enumerate(
            zip(config.models, clients, infos, vocabs, weights, strict=True)
        )
    ]
    for m in members:
        log.info(
            "model %s at %s: %d tokens (%s)", m.spec.name, m.client.address, m.info.vocab_size, m.info.tokenizer_kind
        )
    log.info("union vocabulary: %d entries", union.size)
    transport = Transport(top_k=config.transport.top_k, half=config.transport.dtype == "float16")
    return Ensemble(config, members, union, transport)
