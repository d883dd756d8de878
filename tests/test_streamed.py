"""Decode-sized CPU matmuls as (W xᵀ)ᵀ: the same function as nn.Linear, only where it was measured to pay."""

from __future__ import annotations

import pytest
import torch

from rosa2.streamed import MAX_ROWS, StreamedLinear, streamed_linears


@pytest.mark.parametrize("rows", [1, 2, 8, MAX_ROWS, MAX_ROWS + 1])
def test_streamed_linear_is_the_linear_function(rows):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 320, bias=False)
    streamed = streamed_linears(torch.nn.Sequential(torch.nn.Linear(96, 320, bias=False)))[0]
    streamed.load_state_dict(plain.state_dict())
    assert type(streamed) is StreamedLinear and isinstance(streamed, torch.nn.Linear)
    x = torch.randn(rows, 1, 96)
    with torch.no_grad():
        expected, got = plain(x), streamed(x)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if not 2 <= rows <= MAX_ROWS:  # one row (a gemv either way) and prefill sizes keep F.linear
        assert torch.equal(got, expected)


def test_autograd_and_biased_layers_keep_f_linear():
    """The parametric update differentiates through F.linear exactly as before; a bias keeps it too."""
    torch.manual_seed(0)
    layer = streamed_linears(torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 32)))
    assert type(layer[0]) is StreamedLinear and type(layer[1]) is StreamedLinear
    x = torch.randn(8, 64, requires_grad=True)
    assert torch.equal(layer[0](x), torch.nn.functional.linear(x, layer[0].weight))
    layer[0](x).sum().backward()
    assert torch.allclose(x.grad, layer[0].weight.sum(0).expand(8, -1))
    with torch.no_grad():
        h = torch.randn(8, 128)
        assert torch.equal(layer[1](h), torch.nn.functional.linear(h, layer[1].weight, layer[1].bias))


def test_loaded_models_stream_and_keep_their_state_dict(tiny):
    """Every Linear of a loaded model is streamed; the state dict (what adapters and checkpoints see) is unchanged."""
    linears = [m for m in tiny.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is StreamedLinear for m in linears)
    names = set(tiny.model.state_dict())
    assert "lm_head.weight" in names or "model.embed_tokens.weight" in names
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        streamed = tiny.model(input_ids=ids).logits[:, -1]
        for m in linears:
            m.__class__ = torch.nn.Linear
        plain = tiny.model(input_ids=ids).logits[:, -1]
    streamed_linears(tiny.model)
    assert torch.allclose(streamed, plain, atol=1e-5)


def test_only_cpu_float32_layers_are_streamed():
    """A layer the streamed path can never serve (here bfloat16; on a GPU, CUDA) keeps nn.Linear."""
    model = streamed_linears(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16)))
    assert type(model[0]) is StreamedLinear and type(model[1]) is torch.nn.Linear
