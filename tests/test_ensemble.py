"""The ensemble served end to end: workers in their own processes, a coordinator, the SDK."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import chorus
from chorus_local.cluster import WorkerProcess
from tests.cluster_helpers import MODELS, LoopThread, coordinator, make_config, worker
from tests.reference import ReferenceModel, reference_generate

PROMPTS = ["12+35=", "48+27=", "7+86=", "3+4=", "héllo 你好 🙂 ", "99+99=", "9+"]


def _texts(target: str, prompts: list[str], **kwargs: object) -> list[str]:
    with chorus.Client(target, timeout=60) as client:
        return [client.generate(prompt=p, **kwargs).text for p in prompts]


@pytest.fixture(scope="module")
def bpe_twin() -> Iterator[WorkerProcess]:
    """A second worker serving the very same model as arith-bpe."""
    w = worker(MODELS / "arith-bpe", "arith-bpe-twin")
    yield w
    w.stop()


def test_two_identical_models_equal_the_single_model(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], bpe_twin: WorkerProcess
) -> None:
    single = make_config([default_workers["arith-bpe"]])
    twins = make_config([default_workers["arith-bpe"], bpe_twin], strategy="gac")
    with coordinator(loop, single) as target:
        alone = _texts(target, PROMPTS, max_new_tokens=10)
    with coordinator(loop, twins) as target:
        together = _texts(target, PROMPTS, max_new_tokens=10)
    assert together == alone
    assert alone[1:3] == ["75", "93"], alone  # the model really answers


# top_k 1000 > vocabulary: the top-k path, exactly; float16: packed half-precision distributions.
@pytest.mark.parametrize(("top_k", "dtype"), [(0, "float32"), (1000, "float32"), (0, "float16")])
def test_gac_equals_in_process_reference(
    loop: LoopThread, default_workers: dict[str, WorkerProcess], top_k: int, dtype: str
) -> None:
    workers = [default_workers["arith-bpe"], default_workers["arith-sp"]]
    config = make_config(workers, strategy="gac", transport={"top_k": top_k, "dtype": dtype})
    with coordinator(loop, config) as target:
        served = _texts(target, PROMPTS, max_new_tokens=8)
    models = [ReferenceModel(MODELS / "arith-bpe"), ReferenceModel(MODELS / "arith-sp")]
    expected = [reference_generate(models, p, 8) for p in PROMPTS]
    assert served == expected


def test_threshold_extremes(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    gated = make_config([bpe, sp], strategy="threshold", model_extras=[{"priority": "primary"}, {}])
    with coordinator(loop, make_config([bpe])) as target:
        primary_alone = _texts(target, PROMPTS, max_new_tokens=8)
    with coordinator(loop, make_config([bpe, sp], strategy="gac")) as target:
        every_step = _texts(target, PROMPTS, max_new_tokens=8)
    with coordinator(loop, gated) as target, chorus.Client(target, timeout=60) as client:
        never = [client.generate(prompt=p, max_new_tokens=8, threshold=0.0) for p in PROMPTS]
        always = [client.generate(prompt=p, max_new_tokens=8, threshold=1.0) for p in PROMPTS]  # 1: always
        middle = [client.generate(prompt=p, max_new_tokens=8, threshold=0.9) for p in PROMPTS]
    assert [r.text for r in never] == primary_alone
    assert [r.text for r in always] == every_step
    for r in never:
        assert r.usage.steps_ensembled == 0
        assert r.usage.models[1].forward_passes == 0  # gating really saves the other model's compute
    for r in always:
        assert r.usage.steps_ensembled == r.usage.steps
    # In between, the supportive model runs only on gated steps and catches up in one pass each.
    for r in middle:
        assert r.usage.models[1].forward_passes == r.usage.steps_ensembled


def test_sampling_is_reproducible_with_a_seed(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]])
    kwargs = {"max_new_tokens": 12, "temperature": 1.5, "top_p": 0.95}
    prompts = ["1", "héllo", "5+", "xyz", "88"]
    with coordinator(loop, config) as target:
        first = [_texts(target, [p], seed=7, **kwargs)[0] for p in prompts]
        again = [_texts(target, [p], seed=7, **kwargs)[0] for p in prompts]
        other = [_texts(target, [p], seed=8, **kwargs)[0] for p in prompts]
    assert first == again
    assert first != other


def test_batch_of_conversations(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    for strategy, extras in (("gac", [{}, {}]), ("threshold", [{"priority": "primary"}, {}])):
        config = make_config([bpe, sp], strategy=strategy, model_extras=extras, threshold=0.9)
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
        with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
            batch = client.generate_batch(conversations, max_new_tokens=6)
            one_by_one = [client.generate(messages=c, max_new_tokens=6) for c in conversations]
        assert [r.text for r in batch] == [r.text for r in one_by_one]
        assert all(r.finish_reason in ("stop", "length") for r in batch)


def test_chat_template_and_streaming(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]])
    messages = [{"role": "user", "content": "12+35="}]
    with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
        whole = client.generate(messages=messages, apply_chat_template=True, max_new_tokens=6, request_id="chat-1")
        anonymous = client.generate(prompt="1+1=", max_new_tokens=2)
        pieces = list(client.stream(messages=messages, apply_chat_template=True, max_new_tokens=6))
        info = client.models()
    assert "".join(pieces) == whole.text
    assert whole.request_id == "chat-1"
    assert len(anonymous.request_id) == 16  # the coordinator made one
    assert [m.name for m in info.models] == ["arith-bpe", "arith-sp"]
    assert {m.tokenizer_kind for m in info.models} == {"byte_level", "sentencepiece"}


def test_stop_strings_cut_the_text(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    config = make_config([default_workers["arith-bpe"]])
    with coordinator(loop, config) as target, chorus.Client(target, timeout=60) as client:
        full = client.generate(prompt="12+35=", max_new_tokens=8)
        assert len(full.text) >= 2, full
        cut = client.generate(prompt="12+35=", max_new_tokens=8, stop=[full.text[1:]])
        streamed = "".join(client.stream(prompt="12+35=", max_new_tokens=8, stop=[full.text[1:]]))
    assert cut.text == full.text[:1]
    assert cut.finish_reason == "stop"
    assert streamed == cut.text


def test_coordinators_share_nothing(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    """Several coordinator replicas serve the same workers at once, with equal answers."""
    config = make_config([default_workers["arith-bpe"], default_workers["arith-sp"]])
    with (
        coordinator(loop, config) as first,
        coordinator(loop, config) as second,
        chorus.Client(first, timeout=60) as a,
        chorus.Client(second, timeout=60) as b,
    ):
        jobs = [(client, p) for client in (a, b) for p in PROMPTS]
        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(lambda job: job[0].generate(prompt=job[1], max_new_tokens=6).text, jobs))
    assert texts[: len(PROMPTS)] == texts[len(PROMPTS) :]


def test_per_request_weights(loop: LoopThread, default_workers: dict[str, WorkerProcess]) -> None:
    """A model weighted to (almost) nothing leaves the answer to the other one."""
    bpe, sp = default_workers["arith-bpe"], default_workers["arith-sp"]
    with coordinator(loop, make_config([bpe])) as target:
        bpe_alone = _texts(target, ["12+35=", "90+9="], max_new_tokens=4)
    with coordinator(loop, make_config([sp])) as target:
        sp_alone = _texts(target, ["12+35=", "90+9="], max_new_tokens=4)
    assert bpe_alone != sp_alone  # the members disagree on these sums
    with coordinator(loop, make_config([bpe, sp])) as target:
        assert _texts(target, ["12+35=", "90+9="], max_new_tokens=4, weights={"arith-sp": 1e-6}) == bpe_alone
        assert _texts(target, ["12+35=", "90+9="], max_new_tokens=4, weights={"arith-bpe": 1e-6}) == sp_alone
