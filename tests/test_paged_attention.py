"""paged_attention's forms agree bit for bit where they compute the same products."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model_worker.paged_attention import PassPlan, SeqAttention, paged_attention


def _plan(keys: torch.Tensor, values: torch.Tensor, runs: list[tuple[int, int]], masked: bool) -> PassPlan:
    """One layer, one group; session i decodes one token (query row i) over its run of keys."""
    seqs = [
        SeqAttention(
            q_start=i,
            q_len=1,
            runs=[[run]],
            # All visible: the same scores as no mask, through the general path's masked softmax.
            masks=[torch.ones(1, run[1], dtype=torch.bool) if masked else None],
        )
        for i, run in enumerate(runs)
    ]
    return PassPlan(block_size=16, group_of={0: 0}, keys={0: keys}, values={0: values}, write=[], seqs=seqs)


@pytest.mark.parametrize("kv_heads,group,dim", [(3, 3, 64), (1, 4, 256), (2, 1, 32)])
def test_a_float32_decode_over_one_run_equals_the_general_path_bitwise(kv_heads: int, group: int, dim: int) -> None:
    """A decode over one run of blocks takes a three-op path (float32, no mask, no branches, no softcap); the
    same sessions with an all-visible mask take the general one: the outputs are identical, as are those of
    a bfloat16 pass, which both take the general way."""
    torch.manual_seed(0)
    runs = [(0, 1), (40, 17), (100, 513), (700, 300)]
    module = SimpleNamespace(layer_idx=0)
    for dtype in (torch.float32, torch.bfloat16):
        keys = torch.randn(kv_heads, 1200, dim).to(dtype)
        values = torch.randn(kv_heads, 1200, dim).to(dtype)
        query = torch.randn(1, kv_heads * group, len(runs), dim).to(dtype)
        outs = [
            paged_attention(
                module,  # type: ignore[arg-type]
                query,
                query,
                query,
                None,
                scaling=dim**-0.5,
                chorus_pass=_plan(keys, values, runs, masked),
            )[0]
            for masked in (False, True)
        ]
        assert outs[0].shape == (1, len(runs), kv_heads * group, dim)
        assert torch.equal(outs[0], outs[1]), dtype
        # And it is attention: the one-key session reads its only value.
        assert torch.allclose(outs[0][0, 0].float(), values[:, 0].float().repeat_interleave(group, 0), atol=1e-2)
