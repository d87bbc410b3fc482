"""The worker's runtime below the server: KV reuse, rollback, healing and batching are exact."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.v1 import worker_pb2, worker_pb2_grpc
from chorus_common.types import Prompt
from model_worker import kv_manager, model_runner, paged_attention
from model_worker.conditioning import Alt, Plan
from model_worker.distribution import Format, Part
from model_worker.loading import load_model
from model_worker.runtime import AtCapacity, Runtime, SessionExpired
from model_worker.server import WorkerServer
from tests import tokenizer_factory
from tests.reference import ReferenceModel
from tests.tiny_models import random_gemma3, random_gpt2, random_llama

FULL = Format(top_k=0, dtype=np.dtype(np.float32))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three attention patterns: absolute positions, rotary with grouped-query attention, and sliding-window
    layers between full ones (Gemma 3, window of 8 tokens: every test's text is longer)."""
    build: Callable[[Path], Path] = {"gpt2": random_gpt2, "llama": random_llama, "gemma3": random_gemma3}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


def _as_dict(runtime: Runtime, parts: list[Part]) -> dict[bytes | None, float]:
    out: dict[bytes | None, float] = {}
    for part in parts:
        ids = range(runtime.vocab_size) if part.ids is None else part.ids.tolist()
        for i, lp in zip(ids, part.logprobs.tolist(), strict=True):
            if i in runtime.eos_ids:
                key = None
            elif runtime.special[i]:
                continue
            else:
                key = runtime.tokens[i][part.skip_bytes :]
            out[key] = out.get(key, 0.0) + math.exp(lp + part.log_scale)
    return out


def _assert_close(a: dict[bytes | None, float], b: dict[bytes | None, float]) -> None:
    keys = set(a) | set(b)
    assert max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys) < 1e-5


def _assert_relatively_close(a: dict[bytes | None, float], b: dict[bytes | None, float]) -> None:
    """Every entry within 0.1% of its size: a small part (a second spelling's) cannot hide under 1e-5."""
    for k in set(a) | set(b):
        x, y = a.get(k, 0.0), b.get(k, 0.0)
        assert (x > 0) == (y > 0) and (y == 0 or abs(math.log(x / y)) < 1e-3), (k, x, y)


def test_steps_match_a_recompute_from_scratch(model_dir: Path) -> None:
    """Each step with a kept KV cache equals the brute-force reference (no cache, healing by scan)."""
    runtime = Runtime(load_model(str(model_dir)))
    reference = ReferenceModel(model_dir)

    async def run() -> None:
        runtime.engine.start()
        prompt = "héllo "
        session = await runtime.open(Prompt(text=prompt))
        state = reference.start(prompt)
        for piece in ["", "w", "o", "rl", "d", " 你", "好", "!"]:
            out = await runtime.step(session, piece.encode(), FULL)
            reference.commit(state, piece.encode())
            _assert_close(_as_dict(runtime, out.parts), reference.next_bytes(state))
        await runtime.engine.stop()

    asyncio.run(run())


def test_split_characters_match_the_reference(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)))
    reference = ReferenceModel(model_dir)

    async def run() -> None:
        runtime.engine.start()
        session = await runtime.open(Prompt(text="a"))
        state = reference.start("a")
        committed = b""
        for target in ("🙂".encode()[:1], "🙂".encode()[:3], "🙂".encode(), "🙂é".encode()[:5]):
            piece = target[len(committed) :]
            out = await runtime.step(session, piece, FULL)
            reference.commit(state, piece)
            committed = target
            _assert_close(_as_dict(runtime, out.parts), reference.next_bytes(state))
        await runtime.engine.stop()

    asyncio.run(run())


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def code_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three attention patterns with a byte-level BPE that learnt runs of spaces from indented code."""
    build: Callable[..., Path] = {"gpt2": random_gpt2, "llama": random_llama, "gemma3": random_gemma3}[request.param]
    corpus = tokenizer_factory.CORPUS + tokenizer_factory.CODE_CORPUS
    return build(tmp_path_factory.mktemp(request.param), tokenizer=tokenizer_factory.byte_level_bpe(corpus=corpus))


def test_a_run_of_spaces_is_read_in_both_spellings_as_the_reference_does(code_model_dir: Path) -> None:
    """Spaces committed one by one after a line break (CharED's indentation): where the run that ends the
    text is spelt otherwise before a word, the step counts both spellings, the second from a branch row
    computed in the same pass (its own keys beside the stored ones). Each step, its lookups, and a scored
    continuation over the same pieces equal the brute-force reference, which runs that spelling as a plain
    forward."""
    runtime = Runtime(load_model(str(code_model_dir)))
    reference = ReferenceModel(code_model_dir)
    prompt = "def add(a, b):\n    return a + b\n\ndef f(x):"
    # Spaces one by one (b"  " is one token, b" " + b" a" before a word), then a line break and two spaces
    # as one piece (one token, b"\n" + b" " + b" a" before a word: a branch of two tokens).
    pieces = [b"\n", b" ", b" ", b" ", b" ", b"r", b"eturn", b"\n  ", b" ", b"x"]

    async def run() -> tuple[int, list[list[Part] | None]]:
        runtime.engine.start()
        session = await runtime.open(Prompt(text=prompt))
        await runtime.step(session, b"", FULL)
        state = reference.start(prompt)
        both = 0
        spellings = set()
        for piece in pieces:
            out = await runtime.step(session, piece, FULL, partial=True)
            reference.commit(state, piece, partial=True)
            expected = reference.next_bytes(state)
            _assert_relatively_close(_as_dict(runtime, out.parts), expected)
            # A lookup of an entry's exact bytes (b"" for the end) sums every spelling of it, both runs' too.
            likely = sorted(expected, key=expected.__getitem__)[-8:]
            looked = runtime.lookup(session, [b"" if k is None else k for k in likely])
            assert all(abs(lp - math.log(expected[k])) < 1e-3 for k, lp in zip(likely, looked, strict=True))
            both += any(part.replaces == -1 for part in out.parts)
            plan = session.last_plan
            if plan is not None and plan.alt is not None:
                spellings.add(len(plan.alt.tokens))
        assert spellings == {1, 2}, spellings
        scored_session = await runtime.open(Prompt(text=prompt))
        await runtime.step(scored_session, b"", FULL)
        scored = await runtime.score(scored_session, b"", 0, pieces, top_k=runtime.vocab_size, partial=True)
        await runtime.engine.stop()
        return both, scored.positions

    both, positions = asyncio.run(run())
    assert both >= 2, "no step read a run of spaces in its other spelling"
    state = reference.start(prompt)
    checked = 0
    for j, parts in enumerate(positions):
        if j:
            reference.commit(state, pieces[j - 1], partial=True)
        if parts is not None:
            _assert_relatively_close(_as_dict(runtime, parts), reference.next_bytes(state))
            checked += any(part.replaces == -1 for part in parts)
    assert checked >= 2


def test_a_second_spelling_that_would_pass_the_context_is_left_out(code_model_dir: Path) -> None:
    """A branch's tokens sit from the run's last token on: where they would pass the context (a model with
    absolute positions has no embedding there), the step reads the run as it ends the text only."""
    runtime = Runtime(load_model(str(code_model_dir), max_model_len=24))
    assert runtime.context_length == 24

    def plan(tokens: tuple[int, ...]) -> Plan:  # 23 tokens, the most a step reads: the last is a run
        return Plan(list(range(22)), 22, (7,), b"", (b"  ",), alt=Alt(tokens, b" "))

    fits, passes = plan((1, 2)), plan((1, 2, 3))
    assert runtime._branches([fits, passes]) == [(22, (1, 2))]


def test_a_model_alone_reproduces_generate(model_dir: Path) -> None:
    """Greedy steps whose chosen token is committed back give transformers' generate, token for token."""

    loaded = load_model(str(model_dir))
    runtime = Runtime(loaded)

    async def run(prompt: str, n: int) -> list[int]:
        session = await runtime.open(Prompt(text=prompt))
        piece, ids = b"", []
        for _ in range(n):
            out = await runtime.step(session, piece, FULL)
            logprobs = out.parts[0].logprobs.copy()
            logprobs[runtime._not_text] = -np.inf
            token = int(np.argmax(logprobs))
            ids.append(token)
            if token in runtime.eos_ids:
                break
            piece = runtime.tokens[token]
        runtime.close(session)
        return ids

    async def main() -> None:
        runtime.engine.start()
        for prompt in ("hello world", "the cat", "你好", "🙂 ok"):
            mine = await run(prompt, 12)
            inputs = loaded.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                ref = loaded.model.generate(
                    **inputs,
                    max_new_tokens=12,
                    do_sample=False,
                    eos_token_id=runtime.eos_ids,
                    pad_token_id=runtime.eos_ids[0],
                )
            assert mine == ref[0, inputs.input_ids.shape[1] :].tolist()[: len(mine)], prompt
        await runtime.engine.stop()

    asyncio.run(main())


def test_concurrent_sessions_share_forward_passes_exactly(model_dir: Path) -> None:
    """Sessions of different lengths batched together give what each gives alone."""
    runtime = Runtime(load_model(str(model_dir)))
    prompts = ["a", "hello world", "12+35=", "你好", "the cat sat", "🙂 ok"]
    continuation = [b"x", b"y", b"4", b"!", b" on", b" "]

    async def steps(concurrent: bool) -> tuple[list[dict[bytes | None, float]], int]:
        runtime.engine.start()
        sessions = [await runtime.open(Prompt(text=p)) for p in prompts]
        results: list[dict[bytes | None, float]] = []
        biggest = 0
        for appends in ([b""] * len(prompts), continuation, continuation):
            if concurrent:
                outs = await asyncio.gather(*(runtime.step(s, a, FULL) for s, a in zip(sessions, appends, strict=True)))
            else:
                outs = [await runtime.step(s, a, FULL) for s, a in zip(sessions, appends, strict=True)]
            biggest = max([biggest, *(o.batch_size for o in outs)])
            results += [_as_dict(runtime, o.parts) for o in outs]
        for s in sessions:
            runtime.close(s)
        await runtime.engine.stop()
        return results, biggest

    alone, alone_batch = asyncio.run(steps(concurrent=False))
    runtime.engine = type(runtime.engine)(runtime.loaded.model, runtime.loaded.device, runtime.engine.kv)
    together, together_batch = asyncio.run(steps(concurrent=True))
    assert alone_batch == 1
    # Every step of the six sessions shares one pass, though they feed different numbers of tokens.
    assert together_batch == len(prompts)
    for a, b in zip(alone, together, strict=True):
        _assert_close(a, b)
    assert not runtime.sessions and runtime.kv_cache_bytes() == 0


def test_a_pass_leaves_each_session_a_row_of_its_own(model_dir: Path) -> None:
    """Each session keeps the output row of its last pass until its next step: a row owns its storage, so a
    session that idles does not keep the rows of the other sessions of that pass."""
    runtime = Runtime(load_model(str(model_dir)), max_sessions=3)

    async def rows() -> tuple[list[torch.Tensor], list[int]]:
        runtime.engine.start()
        sessions = [await runtime.open(Prompt(text=p)) for p in ("a", "hello world", "12+35=")]
        outs = await asyncio.gather(*(runtime.step(s, b"", FULL) for s in sessions))
        await runtime.engine.stop()
        return [s.kv.rows[len(s.kv.ids) - 1] for s in sessions], [o.batch_size for o in outs]

    got, batches = asyncio.run(rows())
    assert batches == [3, 3, 3]  # one pass
    for row in got:
        assert row.dtype == torch.float32 and row.dim() == 1
        assert row.untyped_storage().nbytes() == row.numel() * row.element_size()


@pytest.mark.parametrize(
    ("static_decode", "gather_all", "fused", "capped"),
    [
        (False, False, False, False),
        (False, True, False, False),
        (False, True, False, True),
        (True, False, False, False),
        (True, False, True, False),
        (True, False, False, True),
    ],
    ids=["ragged", "gather", "gather-capped", "static", "static-fused", "static-capped"],
)
def test_garbage_in_unwritten_cache_cells_never_reaches_a_distribution(
    model_dir: Path, static_decode: bool, gather_all: bool, fused: bool, capped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage is allocated uninitialised; the gathered and static forms read (masked) cells past each
    session's length. With that memory full of NaN, sessions batched together in each form (ragged; every
    decode gathered, as on a GPU; the static form, with pieces of several tokens too; the same with the fused
    SDPA used on CUDA; with the gathered batch capped at one block, the rest attended one by one)
    give what each gives alone in plain ragged passes."""

    def nan_filled(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kv_manager, "uninitialized", nan_filled)

    def static(runtime: Runtime) -> Runtime:
        runtime.engine.runner.static.enabled = static_decode
        if gather_all:  # every decode gathered, as on a GPU
            runtime.engine.runner.gather_up_to = None
        if capped:  # room for one session of one block in a gathered batch
            runtime.engine.runner.gather_positions = runtime.engine.kv.block_size
        return runtime

    def plain(runtime: Runtime) -> Runtime:
        runtime.engine.runner.static.enabled = False
        return runtime

    prompts = ["a", "hello world, a longer prompt", "12+35="]

    async def steps(runtime: Runtime, concurrent: bool) -> list[dict[bytes | None, float]]:
        runtime.engine.start()
        sessions = [await runtime.open(Prompt(text=p)) for p in prompts]
        results = []
        for append in (b"", b"x", b" y", b" and then some more words"):  # the last is several tokens
            if concurrent:
                outs = await asyncio.gather(*(runtime.step(s, append, FULL) for s in sessions))
            else:
                outs = [await runtime.step(s, append, FULL) for s in sessions]
            results += [_as_dict(runtime, o.parts) for o in outs]
        await runtime.engine.stop()
        return results

    loaded = load_model(str(model_dir))
    alone = asyncio.run(steps(plain(Runtime(loaded, max_sessions=4)), concurrent=False))
    if fused:
        monkeypatch.setattr(paged_attention, "FUSED_ON", ("cpu",))
    batches: list[int] = []  # sessions per gathered batch
    gather = model_runner._gather

    def counted(seqs: list[Any], *args: Any, **kwargs: Any) -> Any:
        batches.append(len(seqs))
        return gather(seqs, *args, **kwargs)

    monkeypatch.setattr(model_runner, "_gather", counted)
    together = asyncio.run(steps(static(Runtime(loaded, max_sessions=4)), concurrent=True))
    assert max(batches) == (1 if capped else len(prompts))
    for a, b in zip(alone, together, strict=True):
        assert all(math.isfinite(v) for v in (*a.values(), *b.values()))
        _assert_close(a, b)


def test_cuda_graphs_are_captured_once_per_shape_up_to_a_bound(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static form's graph cache, with the capture stood in for (no CUDA here): one capture per (sessions,
    tokens, width) shape, none past MAX_GRAPHS (those shapes run eagerly), and the same distributions as
    plain ragged passes throughout."""
    captures: list[tuple[int, ...]] = []

    class Replayed:  # replays by running the captured inputs' pass eagerly
        def __init__(self, decoder: model_runner.StaticDecoder) -> None:
            self.decoder = decoder

        def replay(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
            runner = self.decoder.runner
            return runner.forward(tensors[0], tensors[1], self.decoder._plan(tensors), 0)[0]

    def capture(decoder: model_runner.StaticDecoder, tensors: tuple[torch.Tensor, ...]) -> Replayed:
        captures.append(tuple(tensors[0].shape))
        return Replayed(decoder)

    monkeypatch.setattr(model_runner._Captured, "capture", staticmethod(capture))
    monkeypatch.setattr(model_runner, "MAX_GRAPHS", 2)
    prompts = ["a", "hello world, a longer prompt", "12+35="]

    async def steps(runtime: Runtime) -> list[dict[bytes | None, float]]:
        runtime.engine.start()
        sessions = [await runtime.open(Prompt(text=p)) for p in prompts]
        results = []
        for append in (b"", b"x", b" y", b" and then some more words", b"z"):
            outs = [await runtime.step(s, append, FULL) for s in sessions]  # one session per pass
            results += [_as_dict(runtime, o.parts) for o in outs]
            outs = await asyncio.gather(*(runtime.step(s, b"!", FULL) for s in sessions))  # three per pass
            results += [_as_dict(runtime, o.parts) for o in outs]
        await runtime.engine.stop()
        return results

    loaded = load_model(str(model_dir))
    plain = Runtime(loaded, max_sessions=4)
    plain.engine.runner.static.enabled = False
    graphed = Runtime(loaded, max_sessions=4)
    static = graphed.engine.runner.static
    static.enabled = static.cuda_graphs = True
    expected, got = asyncio.run(steps(plain)), asyncio.run(steps(graphed))
    assert len(captures) == static.captured == 2  # more shapes than that were met: they ran eagerly
    for a, b in zip(expected, got, strict=True):
        _assert_close(a, b)


def test_static_widths_pad_a_long_context_by_at_most_a_quarter() -> None:
    widths = {model_runner._width(blocks) for blocks in range(1, 513)}
    assert len(widths) == 20 and max(widths) == 512
    for blocks in range(1, 2049):
        width = model_runner._width(blocks)
        assert width >= blocks and (blocks <= 16 or width - blocks <= max(15, blocks / 4))


def test_prefills_run_in_chunks_and_decodes_pass_between_them(model_dir: Path) -> None:
    """A long prompt prefilled in chunks gives the distribution of one pass; a decode that arrives
    meanwhile is answered before the prefill ends."""
    loaded = load_model(str(model_dir))
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4

    async def first_step(chunk: int) -> tuple[dict[bytes | None, float], bool]:
        runtime = Runtime(loaded, prefill_chunk=chunk)
        runtime.engine.start()
        short = await runtime.open(Prompt(text="a"))
        await runtime.step(short, b"", FULL)
        long = await runtime.open(Prompt(text=long_prompt))
        prefill = asyncio.ensure_future(runtime.step(long, b"", FULL))
        await asyncio.sleep(0)  # the prefill is queued first
        await runtime.step(short, b"b", FULL)
        overtaken = not prefill.done()
        out = await prefill
        await runtime.engine.stop()
        return _as_dict(runtime, out.parts), overtaken

    whole, _ = asyncio.run(first_step(1024))
    chunked, overtaken = asyncio.run(first_step(8))
    _assert_close(whole, chunked)
    assert overtaken


def test_health_is_not_serving_until_the_model_is_loaded(model_dir: Path) -> None:
    async def run() -> None:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            worker = worker_pb2_grpc.ModelWorkerStub(channel)
            loading = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert loading.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await worker.Info(worker_pb2.InfoRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.ready(Runtime(load_model(str(model_dir))))
            ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
            assert (await worker.Info(worker_pb2.InfoRequest(), timeout=5)).vocab_size > 0
        await server.stop(grace=0)

    asyncio.run(run())


def test_a_step_that_names_no_format_is_refused(model_dir: Path) -> None:
    """Enum zero values mean "unspecified": a step without its distribution format is an error, not top-k."""

    async def run() -> None:
        server = WorkerServer("127.0.0.1:0")
        await server.start()
        await server.ready(Runtime(load_model(str(model_dir))))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            session = worker_pb2_grpc.ModelWorkerStub(channel).Session(timeout=30)
            await session.write(worker_pb2.SessionRequest(open=worker_pb2.SessionOpen(prompt={"text": "a"})))
            assert (await session.read()).WhichOneof("kind") == "opened"
            await session.write(worker_pb2.SessionRequest(step=worker_pb2.SessionStep(append=b"b")))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await session.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "step.format" in (caught.value.details() or "")
        await server.stop(grace=0)

    asyncio.run(run())


def test_accelerate_device_map_path_gives_the_same_distribution(model_dir: Path) -> None:
    """device 'auto' with max_memory goes through accelerate's device_map (CPU-only here)."""
    plain = Runtime(load_model(str(model_dir)))
    mapped = Runtime(load_model(str(model_dir), device="auto", max_memory={"cpu": "1GiB"}))

    async def first_step(runtime: Runtime) -> dict[bytes | None, float]:
        runtime.engine.start()
        session = await runtime.open(Prompt(text="hello"))
        out = await runtime.step(session, b"", FULL)
        await runtime.engine.stop()
        return _as_dict(runtime, out.parts)

    _assert_close(asyncio.run(first_step(plain)), asyncio.run(first_step(mapped)))


def test_a_full_worker_makes_new_sessions_wait_then_refuses_them(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)), max_sessions=2, kv_wait_s=0.3)

    async def run() -> None:
        first, _ = await runtime.open(Prompt(text="a")), await runtime.open(Prompt(text="b"))
        with pytest.raises(AtCapacity, match="sessions are held"):
            await runtime.open(Prompt(text="c"))
        waiting = asyncio.ensure_future(runtime.open(Prompt(text="c")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        runtime.close(first)  # a session ends while it waits: it gets in
        runtime.close(await waiting)

    asyncio.run(run())


def test_sessions_idle_past_the_ttl_are_reclaimed(model_dir: Path) -> None:
    runtime = Runtime(load_model(str(model_dir)))

    async def run() -> None:
        runtime.engine.start()
        idle, busy = await runtime.open(Prompt(text="a")), await runtime.open(Prompt(text="b"))
        await runtime.step(idle, b"", FULL)
        await runtime.step(busy, b"", FULL)
        idle.last_used -= 120  # two minutes without a step
        assert runtime.reap(ttl=60) == 1
        assert list(runtime.sessions.values()) == [busy] and not idle.kv.ids
        assert runtime.kv_cache_bytes() == runtime.engine.report().block_size * runtime.kv_bytes_per_token  # busy's
        with pytest.raises(SessionExpired):
            await runtime.step(idle, b"x", FULL)
        await runtime.step(busy, b"x", FULL)  # the active one is untouched
        await runtime.engine.stop()

    asyncio.run(run())


@pytest.mark.parametrize("static_form", [False, True], ids=["ragged", "static"])
def test_score_gives_the_distribution_at_every_token_boundary(model_dir: Path, static_form: bool) -> None:
    """A scoring pass over drafted pieces returns, at each of the model's token boundaries, what the
    brute-force reference gives there (nothing inside a token); the session then holds the pieces. Also in
    the static form (as on a GPU), where a pass of up to 8 tokens wants a row at several of them."""
    runtime = Runtime(load_model(str(model_dir)))
    runtime.engine.runner.static.enabled = static_form
    static_passes = 0
    run_static = runtime.engine.runner.static.run

    def counted(slices: list[Any], key: tuple[int, int, int]) -> Any:
        nonlocal static_passes
        static_passes += any(len(s.want) > 1 for s in slices)
        return run_static(slices, key)

    runtime.engine.runner.static.run = counted  # type: ignore[method-assign]
    reference = ReferenceModel(model_dir)
    prompt, pieces = "the cat ", [b"sat", b" o", b"n", b" the", b" mat", "你".encode()[:2], "你".encode()[2:], b"."]
    if static_form:
        pieces = pieces[:3]  # a scoring pass of at most 8 tokens: the static form's longest

    async def run() -> list[list[Part] | None]:
        runtime.engine.start()
        session = await runtime.open(Prompt(text=prompt))
        await runtime.step(session, b"", FULL)  # the row at the end of the prompt is now cached
        out = await runtime.score(session, b"", 0, pieces, top_k=runtime.vocab_size)
        assert session.generated == b"".join(pieces)
        follow = await runtime.step(session, b"", FULL)  # the session goes on from the scored text
        assert follow.forward_passes == 0
        await runtime.engine.stop()
        return out.positions

    positions = asyncio.run(run())
    assert static_passes == (1 if static_form else 0)  # the scoring pass: several rows wanted
    assert len(positions) == len(pieces) + 1
    state = reference.start(prompt)
    checked = 0
    for j, parts in enumerate(positions):
        if j:
            reference.commit(state, pieces[j - 1])
        if parts is None:
            plan = reference.conditioner.plan(state)
            assert plan.pending or plan.inside  # inside one of its tokens, or inside a character
            continue
        _assert_close(_as_dict(runtime, parts), reference.next_bytes(state))
        checked += 1
    assert checked >= 3


def test_long_prompts_in_chunks_and_shared_prefixes_match_the_reference(model_dir: Path) -> None:
    """Prompts far past Gemma 3's window (8 tokens here) prefilled in small chunks of several sessions per
    pass, sessions that share a prompt's blocks (prefix caching) and roll back into them: every step equals
    the brute-force reference, with prefix caching on and off, and with every decode gathered (as on a GPU:
    sliding layers then read only the blocks their window spans)."""
    loaded = load_model(str(model_dir))
    reference = ReferenceModel(model_dir)
    history = "the history of the city is long; its people built walls and bridges. " * 3

    async def run(prefix_caching: bool, gather_all: bool = False) -> tuple[list[dict[bytes | None, float]], int]:
        runtime = Runtime(loaded, prefill_chunk=16, max_batched_tokens=40, block_size=4, prefix_caching=prefix_caching)
        if gather_all:
            runtime.engine.runner.gather_up_to = None
        runtime.engine.start()
        results = []
        first = await runtime.open(Prompt(text=history + "first"))
        second_open = runtime.open(Prompt(text=history + "second"))
        second = await second_open
        outs = await asyncio.gather(runtime.step(first, b"", FULL), runtime.step(second, b"", FULL))
        results += [_as_dict(runtime, o.parts) for o in outs]
        third = await runtime.open(Prompt(text=history + "first"))  # all of first's prompt but its last block
        for piece, rollback in ((b" a", 0), (b"b", 2), (b" c", 0)):
            outs = [await runtime.step(s, piece, FULL, rollback) for s in (first, third)]
            results += [_as_dict(runtime, o.parts) for o in outs]
        hits = runtime.engine.report().prefix_hit_tokens
        for s in (first, second, third):
            runtime.close(s)
        await runtime.engine.stop()
        return results, hits

    cached, hits = asyncio.run(run(True))
    plain, no_hits = asyncio.run(run(False))
    gathered, _ = asyncio.run(run(True, gather_all=True))
    assert no_hits == 0 and hits > 0
    for a, b, c in zip(cached, plain, gathered, strict=True):
        _assert_close(a, b)
        _assert_close(a, c)
    # Against the reference, the steps that append (a rolled-back step re-tokenizes by another rule there).
    expected = [reference.next_bytes(reference.start(history + p)) for p in ("first", "second")]
    state = reference.start(history + "first")
    reference.commit(state, b" a")
    expected += [reference.next_bytes(state)] * 2
    for got, want in zip(cached[:4], expected, strict=True):
        _assert_close(got, want)


def test_a_greedy_draw_takes_what_the_sampling_path_takes_at_temperature_zero() -> None:
    """`_likeliest` compares log-probabilities plus scales where the sampling path (`_sampled`) exponentiates
    them in float64 and takes the argmax of the concatenation at temperature 0: the same part and entry, ties
    (the first of equals) and special tokens (never drawn) included."""
    from types import SimpleNamespace

    from chorus_common.types import SamplingParams

    rng = np.random.default_rng(7)
    vocab = 500
    checked = {"masked top": 0, "tie": 0, "sparse wins": 0}
    for case in range(400):
        not_text = rng.random(vocab) < 0.05
        dense = (rng.standard_normal(vocab) * 3).astype(np.float32)
        if case % 4 == 0:  # the top is a special token
            dense[int(np.flatnonzero(not_text)[0])] = dense.max() + 5
            checked["masked top"] += 1
        if case % 5 == 0:  # two text entries equal at the top
            i, j = np.flatnonzero(~not_text)[[3, 40]]
            dense[[i, j]] = dense[~not_text].max() + 1
            checked["tie"] += 1
        dense -= np.float32(np.log(np.exp(dense.astype(np.float64)).sum()))
        parts = []
        for _ in range(int(rng.integers(0, 3))):  # healing levels before the dense part: sparse, scaled
            ids = rng.choice(vocab, size=int(rng.integers(1, 30)), replace=False).astype(np.uint32)
            values = (rng.standard_normal(ids.size) - 1).astype(np.float32)
            scale = float(rng.choice([0.0, -0.5, float(values.max() * -1 + dense.max())]))  # now and then a tie
            parts.append(Part(1, scale, ids, values))
        parts.append(Part(0, float(rng.choice([0.0, -1.25])), None, dense))
        fake = SimpleNamespace(_not_text=not_text)
        got = Runtime._likeliest(fake, parts)  # type: ignore[arg-type]
        # The sampling path at temperature 0: pick's argmax over the probabilities concatenated.
        assert got == Runtime._sampled(fake, parts, SamplingParams(), np.random.default_rng(0)), case  # type: ignore[arg-type]
        checked["sparse wins"] += got[0] < len(parts) - 1
    assert all(checked.values()), checked


def test_a_greedy_draft_reads_the_top_of_the_logits_as_the_parts_would_give_it() -> None:
    """Where the text ends on a token boundary a greedy draft takes the top text token of the last row's logits
    (`_greedy_token`) instead of building the distribution: the token `_likeliest` picks from that row's dense
    part, with the top a special token (never drawn) and ties (the first of equals) included."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(3)
    vocab = 500
    checked = {"masked top": 0, "tie": 0}
    for case in range(200):
        not_text = torch.rand(vocab, generator=gen) < 0.05
        row = torch.randn(vocab, generator=gen) * 3
        if case % 4 == 0:  # the top is a special token
            row[int(torch.nonzero(not_text)[0])] = row.max() + 5
            checked["masked top"] += 1
        if case % 5 == 0:  # two text entries equal at the top
            text = torch.nonzero(~not_text)[:, 0]
            row[text[[3, 40]]] = row[~not_text].max() + 1
            checked["tie"] += 1
        fake = SimpleNamespace(_not_text=not_text.numpy())
        part = Part(0, 0.0, None, torch.log_softmax(row, -1).numpy())
        assert Runtime._greedy_token(fake, row) == Runtime._likeliest(fake, [part])[1], case  # type: ignore[arg-type]
    assert all(checked.values()), checked
