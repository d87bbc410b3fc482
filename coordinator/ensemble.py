"""The ensemble a coordinator serves: its models, their worker replicas, and the union vocabulary.

Workers join and leave at run time (Kubernetes discovery, or fixed addresses). A model may have
many replicas; each request is placed on one replica of every model (the one likely to hold its
prompt's prefix, else the least loaded: placement.py) and stays there for its lifetime, since its KV
cache lives there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from chorus_common.security import TlsFiles
from coordinator import placement
from coordinator.config import EnsembleConfig, ModelSpec
from coordinator.types import WorkerInfo
from coordinator.union_vocab import ModelVocab, UnionVocab
from coordinator.workers import Transport, WorkerClient

log = logging.getLogger(__name__)


class NotReady(Exception):
    """A model has no ready worker now; the request may be retried (UNAVAILABLE)."""


@dataclass(eq=False)  # compared and hashed by identity: a worker that rejoins at an address is a new replica
class Replica:
    client: WorkerClient
    active: int = 0  # requests placed here now
    retired: bool = False  # left discovery; closed once its last request ends


@dataclass
class Member:
    spec: ModelSpec
    weight: float
    info: WorkerInfo | None = None
    vocab: ModelVocab | None = None
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # model id -> union id
    replicas: dict[str, Replica] = field(default_factory=dict)

    def acquire(self, key: bytes | None = None, avoid: frozenset[Replica] = frozenset()) -> Replica:
        """A replica reserved for one request (not one in `avoid`): the one likely to hold its prefix `key` in
        its KV cache (placement.py), or the least loaded when there is no key or that one is busy."""
        live = [(a, r) for a, r in self.replicas.items() if not r.retired and r not in avoid]
        if not live:
            raise NotReady(f"model {self.spec.name!r} has no ready worker")
        replica = live[placement.choose(live, key)][1]
        replica.active += 1
        return replica

    async def release(self, replica: Replica) -> None:
        replica.active -= 1
        if replica.retired and replica.active == 0:
            await replica.client.close()


class Changes:
    """Wakes the requests that wait for a worker to join (Ensemble.acquire)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next change, or timeout seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@dataclass
class Ensemble:
    config: EnsembleConfig
    members: list[Member]
    transport: Transport
    union: UnionVocab | None = None
    listeners: list[Callable[[], None]] = field(default_factory=list)  # told when readiness may change
    changes: Changes = field(default_factory=Changes)  # shared with the ensembles alone()

    @classmethod
    def from_config(cls, config: EnsembleConfig) -> Ensemble:
        members = [Member(spec, w) for spec, w in zip(config.models, config.weight_vector(), strict=True)]
        transport = Transport(top_k=config.transport.top_k, half=config.transport.dtype == "float16")
        return cls(config, members, transport)

    def alone(self, name: str) -> Ensemble:
        """One member alone, for a request that names it: the same replicas (placement and release as in
        the whole ensemble), the same union vocabulary, the whole weight."""
        member = next(m for m in self.members if m.spec.name == name)
        members = [replace(member, weight=1.0)]
        return Ensemble(self.config.alone(name), members, self.transport, self.union, changes=self.changes)

    async def acquire(self, member: Member, key: bytes | None, avoid: frozenset[Replica], wait: float) -> Replica:
        """member.acquire; where no replica but those in `avoid` is ready (in a rolling restart the replica
        that refused is draining, and its successor is ready but the coordinator has not yet fetched its
        Info), waits up to `wait` seconds for one to join, then NotReady."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return member.acquire(key, avoid)
            except NotReady:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await self.changes.wait(left)

    @property
    def worker_tls(self) -> TlsFiles | None:
        t = self.config.worker_tls
        return None if t is None else TlsFiles(Path(t.cert), Path(t.key), Path(t.ca), t.server_name)

    @property
    def primary(self) -> int | None:
        return self.config.primary_index

    @property
    def ready(self) -> bool:
        return self.union is not None and all(any(not r.retired for r in m.replicas.values()) for m in self.members)

    def check_ready(self) -> None:
        if self.union is None:
            waiting = [m.spec.name for m in self.members if m.vocab is None]
            raise NotReady(f"waiting for the first worker of {waiting}")

    async def add_worker(self, model: str, address: str) -> None:
        """A ready worker of `model` at `address` joins (again)."""
        member = next((m for m in self.members if m.spec.name == model), None)
        if member is None:
            log.warning("ignoring worker %s: model %r is not in the config", address, model)
            return
        if address in member.replicas and not member.replicas[address].retired:
            return
        client = WorkerClient(address, self.worker_tls)
        try:
            info = await client.info()
            if member.info is not None and info.fingerprint != member.info.fingerprint:
                raise RuntimeError(f"fingerprint {info.fingerprint[:12]} differs from {member.info.fingerprint[:12]}")
            vocab = await client.vocabulary(info)
        except Exception as exc:
            log.error("worker %s of %s refused: %s", address, model, exc)
            await client.close()
            return
        member.info, member.vocab = info, vocab
        member.replicas[address] = Replica(client)
        log.info("worker %s of %s joined (%d tokens, %s)", address, model, info.vocab_size, info.tokenizer_kind)
        if self.union is None and all(m.vocab is not None for m in self.members):
            self.union = UnionVocab([m.vocab for m in self.members if m.vocab is not None])
            for m, index in zip(self.members, self.union.index, strict=True):
                m.index = index
            log.info("union vocabulary: %d entries", self.union.size)
        self._notify()

    async def remove_worker(self, model: str, address: str) -> None:
        """The worker left: no new requests go there; running ones finish where they are."""
        member = next((m for m in self.members if m.spec.name == model), None)
        replica = member.replicas.pop(address, None) if member else None
        if replica is None:
            return
        log.info("worker %s of %s left", address, model)
        replica.retired = True
        if replica.active == 0:
            await replica.client.close()
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()
        self.changes.notify()

    async def close(self) -> None:
        clients = [r.client for m in self.members for r in m.replicas.values()]
        await asyncio.gather(*(c.close() for c in clients))


async def connect(config: EnsembleConfig, addresses: list[str], timeout: float = 600.0) -> Ensemble:
    """An ensemble over fixed worker addresses (one per model, in config order), once all are ready."""
    ensemble = Ensemble.from_config(config)
    probes = [WorkerClient(a, ensemble.worker_tls) for a in addresses]
    try:
        await asyncio.gather(*(p.wait_ready(timeout) for p in probes))
    finally:
        await asyncio.gather(*(p.close() for p in probes))
    for spec, address in zip(config.models, addresses, strict=True):
        await ensemble.add_worker(spec.name, address)
    if not ensemble.ready:
        raise RuntimeError("some workers were refused; see the log")
    return ensemble
