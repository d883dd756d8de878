"""Decode-sized CPU matmuls in the operand order MKL streams fastest.

``nn.Linear`` computes x Wᵀ. At the few rows of a decode step (one per live session) MKL's sgemm
packs the whole weight, its right operand, on every call; W xᵀ instead streams W once as the left
operand. Same products and sums, another order of summation: replies can differ where two logits
tie to float rounding, as a padded batch's already can. Measured on the 2-core AMD EPYC, float32:
SmolLM2's 49152x576 LM head at 8 rows 20.9 -> 8.5 ms and at 2 rows 17.1 -> 4.8 ms; a 64-token
generation of 8 rows 8.5 -> 7.3 s (median of 4, the same tokens). A prefill's hundreds of rows
were no faster (584 rows: 1.0-1.2 s either way; the update's 214-token forward, autograd on:
6.4 s against 6.7 s for four sessions), one row is a gemv either way, and CUDA has no such
packing: those keep ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_ROWS = 64  # a decode step's rows (one per live session); prefill-sized inputs measured no faster


class StreamedLinear(torch.nn.Linear):
    """``nn.Linear`` whose decode-sized CPU forward is (W xᵀ)ᵀ: CPU, float32, no bias, no autograd
    (the parametric update keeps ``F.linear`` and its backward), 2 to ``MAX_ROWS`` rows."""

    def forward(self, x: Any) -> Any:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            2 <= rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
            and self.weight.dtype == torch.float32 and self.bias is None and not torch.is_grad_enabled()
        ):
            out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
            return out.view(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def streamed_linears(model: Any) -> Any:
    """Give every plain ``nn.Linear`` of ``model`` whose weight is a CPU float32 tensor
    :class:`StreamedLinear`'s forward: the same modules, weights, hooks and state dict; only the
    class changes. A CUDA or bfloat16 model keeps ``nn.Linear`` and pays no per-call check on its
    hot path. Returns ``model``."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32:
            module.__class__ = StreamedLinear
    return model
