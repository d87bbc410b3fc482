"""The few-rows output layer: 2..8 rows as weight @ rows.T, every other count exactly as nn.Linear; the model's
own head switched in place (weights still tied), only for float32 on the CPU; the engine uses it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional

from model_worker import vocab_projection
from model_worker.vocab_projection import MAX_ROWS, FewRowsLinear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def _layer(bias: bool) -> FewRowsLinear:
    torch.manual_seed(0)
    layer = FewRowsLinear(64, 4096, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_a_few_rows_are_the_transposed_product_and_others_the_plain_one(bias: bool) -> None:
    layer = _layer(bias)
    with torch.inference_mode():
        for rows in range(1, MAX_ROWS + 4):
            x = torch.randn(1, rows, 64)
            out = layer(x)
            plain = functional.linear(x, layer.weight, layer.bias)
            assert out.shape == (1, rows, 4096) and out.is_contiguous()
            if 2 <= rows <= MAX_ROWS:
                transposed = torch.mm(layer.weight, x[0].t()).t() + (layer.bias if bias else 0)
                assert torch.equal(out[0], transposed)
                torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-4)
            else:
                assert torch.equal(out, plain)


def test_rows_are_counted_over_every_leading_dimension() -> None:
    layer = _layer(bias=False)
    with torch.inference_mode():
        x = torch.randn(2, 3, 64)  # 6 rows: the few-rows product, shape kept
        out = layer(x)
        assert out.shape == (2, 3, 4096)
        assert torch.equal(out.reshape(6, -1), torch.mm(layer.weight, x.reshape(6, 64).t()).t())


def test_the_models_own_head_is_switched_in_place_and_stays_tied() -> None:
    import bench_engine

    model = bench_engine.random_model(TINY_LLAMA)
    head = model.get_output_embeddings()
    assert vocab_projection.few_rows(model) is True
    assert model.get_output_embeddings() is head and type(head) is FewRowsLinear
    assert head.weight is model.get_input_embeddings().weight
    assert vocab_projection.few_rows(model, on=False) is False and type(head) is nn.Linear


def test_only_a_float32_head_on_the_cpu_is_switched() -> None:
    import bench_engine

    model = bench_engine.random_model(TINY_LLAMA, dtype=torch.bfloat16)
    assert vocab_projection.few_rows(model) is False
    assert type(model.get_output_embeddings()) is nn.Linear


def test_the_engine_runs_a_few_sessions_through_it_and_the_bench_compares_both() -> None:
    import bench_engine

    from model_worker.kv_layout import KVLayout
    from model_worker.kv_manager import KVManager
    from model_worker.model_runner import ModelRunner

    model = bench_engine.random_model(TINY_LLAMA)
    kv = KVManager(KVLayout.of(model.config, torch.float32), 0, 4, 64, 16, torch.device("cpu"), prefix_caching=False)
    ModelRunner(model, kv, torch.device("cpu"))
    assert type(model.get_output_embeddings()) is FewRowsLinear
    rows = bench_engine.few_rows_ratio(model, sessions=(1, 3), context=16, rounds=2)
    assert [r["sessions"] for r in rows] == [1, 3]
    assert all(r["few_rows_ms"] > 0 and r["plain_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert type(model.get_output_embeddings()) is FewRowsLinear  # the bench leaves it as the engine had it
