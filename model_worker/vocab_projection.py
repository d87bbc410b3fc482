"""The output layer (hidden state -> vocabulary logits) of a CPU float32 model, for passes that want a few rows.

A pass wants the logits of 2 to 8 rows when a few sessions decode together, or when a draft is verified.
torch's CPU BLAS (MKL, torch 2.13) multiplies so few rows by a tall weight 2-3x slower than it multiplies
one: Gemma 3's 262,144 x 640 output layer takes 66 ms for one row but 137 / 224 ms for 2 / 3 rows, while
the same product written the other way round, weight @ rows.T, streams the weight once (60 / 62 ms; at
10-24 rows the plain product is the faster one). The hidden layers' small matrices are faster the plain
way at every size, so only the output layer is changed. (With two threads the plain product of 2-64 rows
runs on one of them while weight @ rows.T uses both: the rule, measured with one thread as the benches run
workers, leaves that gain above 8 rows untaken.) `scripts/bench.py --only few_rows` measures it (a decode
pass of 2, 3, 4 and 8 sessions of a Gemma 3-shaped model, with / without).

The sums run in another order, so the logits differ from the plain product's in their last bits (as those
of any two batch shapes already do); one row, and more than 8, go through the plain product unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MAX_ROWS = 8  # up to this many rows: weight @ rows.T (measured on this project's CPU machines, above)


class FewRowsLinear(nn.Linear):
    """nn.Linear computing 2..MAX_ROWS rows as (weight @ rows.T).T, every other count as nn.Linear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not 2 <= rows.shape[0] <= MAX_ROWS:
            return super().forward(x)
        out = torch.mm(self.weight, rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], out.shape[-1])


def few_rows(model: Any, on: bool = True) -> bool:
    """Make the model's output layer a FewRowsLinear (on) or a plain nn.Linear again (off): the same module
    object, so its weight stays tied to the input embeddings where it was. Only a float32 output layer on
    the CPU is changed; whether the layer is now a FewRowsLinear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head) not in (nn.Linear, FewRowsLinear):
        return False  # a subclass of its own (a quantized layer, say): its forward is not ours to replace
    if head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return False
    head.__class__ = FewRowsLinear if on else nn.Linear
    return on
