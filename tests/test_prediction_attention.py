"""The EBT prediction stream's attention Function (models/fused.py): its value and its first and second derivatives
equal autograd of the composed ops it replaced, and it keeps no attention map for the second-order graph."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.flop_counter import FlopCounterMode

from ebwm_scale.models.fused import prediction_attention

NAMES = ("q", "k", "v", "k_ctx", "v_ctx")


def composed_prediction_attention(q, k, v, k_ctx, v_ctx):
    """The reference: the same attention as autograd ops, which keep P, dP and dS for a second derivative."""
    rows, keys = q.shape[-2], k_ctx.shape[-2]
    causal = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
    scores_ctx = (q @ k_ctx.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~causal, float("-inf"))
    score_self = (q * k).sum(-1, keepdim=True) / math.sqrt(q.shape[-1])
    probs = F.softmax(torch.cat((scores_ctx, score_self), dim=-1), dim=-1)  # (B, nh, S, T + 1)
    return probs[..., :keys] @ v_ctx + probs[..., keys:] * v


def inputs(seq_len, context_len, dtype=torch.float64, batch=2, heads=2, head_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = (seq_len, seq_len, seq_len, context_len, context_len)
    return [torch.randn(batch, heads, n, head_dim, generator=generator, dtype=dtype).requires_grad_() for n in lengths]


@pytest.mark.parametrize("context_len", [3, 5], ids=["T==S", "T>S"])
def test_prediction_attention_first_and_second_derivatives(context_len):
    """Against finite differences, and equal to the composed ops in value."""
    x = inputs(3, context_len)
    assert gradcheck(prediction_attention, x) and gradgradcheck(prediction_attention, x)
    torch.testing.assert_close(prediction_attention(*x), composed_prediction_attention(*x), rtol=1e-13, atol=1e-13)


# (inputs of the first derivative, which of its results are differentiated further): all, single ones (the others'
# cotangents arrive as None) and the MCMC's pattern (the energy gradient w.r.t. the candidate leaves the context out)
SECOND_ORDER_CASES = [((0, 1, 2, 3, 4), (0, 1, 2, 3, 4))] + [((0, 1, 2, 3, 4), (i,)) for i in range(5)]
SECOND_ORDER_CASES += [((0, 1, 2), (0, 1, 2)), ((0,), (0,))]


@pytest.mark.parametrize("context_len", [4, 6], ids=["T==S", "T>S"])
@pytest.mark.parametrize("wrt, kept", SECOND_ORDER_CASES)
def test_prediction_attention_second_derivatives_equal_the_composed_ops(context_len, wrt, kept):
    x = inputs(4, context_len)
    upstream = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for op in (prediction_attention, composed_prediction_attention):
        first = torch.autograd.grad(op(*x), [x[i] for i in wrt], upstream, create_graph=True)
        loss = sum((first[wrt.index(i)] * torch.cos(x[i])).sum() for i in kept)
        results.append((first, torch.autograd.grad(loss, (*x, upstream), materialize_grads=True)))
    (ours_first, ours), (ref_first, ref) = results
    for got, expected in zip(ours_first, ref_first):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, got, expected in zip((*NAMES, "upstream"), ours, ref):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("leaf", [True, False], ids=["leaf-context", "computed-context"])
def test_prediction_attention_skips_context_gradients_nobody_uses(leaf):
    """The MCMC's autograd.grad(E, candidate) asks for no context key/value gradient: the backward computes the same
    as when the context needs no gradient at all (the engine is asked; a leaf gets a node through a view)."""

    def flops(wrt, context_grad=True):
        q, k, v, k_ctx, v_ctx = inputs(8, 8, torch.float32)
        if not context_grad:
            k_ctx, v_ctx = k_ctx.detach(), v_ctx.detach()
        elif not leaf:
            k_ctx, v_ctx = k_ctx * 1.0, v_ctx * 1.0
        x = (q, k, v, k_ctx, v_ctx)
        out = prediction_attention(*x)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(out.sum(), [x[i] for i in wrt], create_graph=True)
        return counter.get_total_flops()

    assert flops((0, 1, 2)) == flops((0, 1, 2), context_grad=False) < flops((0, 1, 2, 3, 4))


def _saved_map_storages(op, x):
    """Distinct storages of at least one (B, nh, S, T) map that the forward and a first backward with a graph save."""
    maps = x[0].shape[0] * x[0].shape[1] * x[0].shape[2] * x[3].shape[2]
    storages = set()

    def pack(tensor):
        if tensor.numel() >= maps:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = op(*x)
        torch.autograd.grad(out, x[:3], torch.randn_like(out).requires_grad_(), create_graph=True)
    return len(storages)


def test_prediction_attention_keeps_no_attention_map_for_the_second_order_graph():
    """The Function keeps its inputs, the incoming gradient and a log-sum-exp per row; the composed ops keep P, dP,
    dS and more of the (B, nh, S, T + 1) maps."""
    x = inputs(16, 24, torch.float32)  # maps (16 x 24) larger than keys/values (24 x 4)
    assert _saved_map_storages(prediction_attention, x) == 0
    assert _saved_map_storages(composed_prediction_attention, x) >= 3


def test_prediction_attention_refuses_a_third_derivative():
    x = inputs(3, 5)
    (grad,) = torch.autograd.grad(prediction_attention(*x).pow(2).sum(), x[0], create_graph=True)
    torch.autograd.grad(grad.pow(2).sum(), x, retain_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):  # a graph of the second derivative
        torch.autograd.grad(grad.pow(2).sum(), x[0], create_graph=True)


def test_prediction_attention_under_bf16_autocast():
    """bf16 operands, the softmax in fp32: value, energy gradient and second-order gradients finite and close to the
    fp32 ones. The second backward runs outside autocast, as a training step's may."""

    def step(x, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = prediction_attention(*x)
            first = torch.autograd.grad(out.float().pow(2).sum(), x[:3], create_graph=True)
        second = torch.autograd.grad(sum(g.float().pow(2).sum() for g in first), x)
        return out, first, second

    reference = [t.detach().float().requires_grad_() for t in inputs(32, 40, torch.float32, head_dim=16)]
    low = [t.detach().bfloat16().requires_grad_() for t in reference]
    out, first, second = step(low, True)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in (*first, *second))
    ref_out, ref_first, ref_second = step(reference, False)
    for got, expected in zip((out, *first, *second), (ref_out, *ref_first, *ref_second), strict=True):
        assert torch.isfinite(got).all()
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.05 * scale)
