"""RMSNorm and the SwiGLU gate as autograd Functions with hand-written first and second derivatives.

The EBT's loss differentiates through the energy's gradient, so autograd keeps the graph of every backward op. Composed
of elementwise ops, an RMSNorm leaves 7 (B, L, D) tensors in that graph and silu(a) * b leaves 10; these Functions
keep the inputs and the incoming gradient only (2 and 3). The second derivatives below are the closed forms of the
first; tests/test_models.py checks both against finite differences in float64. A third derivative is refused.

RMSNorm: n = x r with r = (mean(x^2) + eps)^-1/2, y = n w. With q = g w and T(v) = r (v - n mean(v n)):
    dx = T(q),  dw = sum over rows of g n
SiLU gate: y = silu(a) b with silu = a sigmoid(a), s1 = silu', s2 = silu'':
    da = g b s1,  db = g silu(a)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _refuse_third_order(what: str) -> None:
    # The second derivative is computed without a graph: a further derivative would silently be zero.
    if torch.is_grad_enabled():
        raise RuntimeError(f"a third derivative of {what} is not implemented")


def _through_norm(v: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """T(v) = r (v - n mean(v n)): a gradient at the normalized output pulled back through the normalization."""
    return rstd * (v - normed * (v * normed).mean(-1, keepdim=True))


def _silu_slope(a: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """silu'(a) from a and sigmoid(a)."""
    return sig * (1 + a * (1 - sig))


def _row_sum(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum over every leading dim: the gradient of a weight broadcast over rows."""
    return x.reshape(-1, x.shape[-1]).sum(0).to(like.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = _wide(x)
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (wide * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        return (*_RMSNormGrad.apply(x, weight, rstd, grad), None)


class _RMSNormGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rstd, grad):
        normed, g = _wide(x) * rstd, _wide(grad)
        dx = _through_norm(g * weight, normed, rstd)
        ctx.save_for_backward(x, weight, rstd, grad)
        return dx.to(x.dtype), _row_sum(g * normed, weight)

    @staticmethod
    def backward(ctx, cot_dx, cot_dw):
        """L = <a, dx> + <b, dw>. With s_an = mean(a n), m = mean(q n): the gradient for g is w T(a) + b n, for w
        sum(g T(a)), for x T(L_n) - r^2 (mean(a q) - m s_an) n with L_n = b g - r (q s_an + a m)."""
        _refuse_third_order("RMSNorm")
        x, weight, rstd, grad = ctx.saved_tensors
        normed, g = _wide(x) * rstd, _wide(grad)
        q = g * weight
        d_g, d_w, d_normed, d_rstd = torch.zeros_like(g), None, torch.zeros_like(g), 0.0
        if cot_dw is not None:
            d_g, d_normed = normed * cot_dw, g * cot_dw
        if cot_dx is not None:
            a = _wide(cot_dx)
            t_a = _through_norm(a, normed, rstd)
            s_an, m = (a * normed).mean(-1, keepdim=True), (q * normed).mean(-1, keepdim=True)
            d_g = d_g + weight * t_a
            d_w = _row_sum(g * t_a, weight)
            d_normed = d_normed - rstd * (q * s_an + a * m)
            d_rstd = rstd.square() * ((a * q).mean(-1, keepdim=True) - m * s_an)
        d_x = _through_norm(d_normed, normed, rstd) - d_rstd * normed
        return d_x.to(x.dtype), d_w, None, d_g.to(grad.dtype)


class _SiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _SiluGateGrad.apply(gate, up, grad)


class _SiluGateGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, grad):
        a, b, g = _wide(gate), _wide(up), _wide(grad)
        sig = torch.sigmoid(a)
        ctx.save_for_backward(gate, up, grad)
        return (g * b * _silu_slope(a, sig)).to(gate.dtype), (g * a * sig).to(up.dtype)

    @staticmethod
    def backward(ctx, cot_gate, cot_up):
        """L = <c_a, g b s1> + <c_b, g silu(a)>: gradients c_a b s1 + c_b silu(a) for g, c_a g s1 for b and
        g (c_a b s2 + c_b s1) for a, with s2 = sigmoid (1 - sigmoid) (2 + a (1 - 2 sigmoid))."""
        _refuse_third_order("the SiLU gate")
        gate, up, grad = ctx.saved_tensors
        a, b, g = _wide(gate), _wide(up), _wide(grad)
        sig = torch.sigmoid(a)
        s1 = _silu_slope(a, sig)
        zero = torch.zeros_like(a)
        c_a = zero if cot_gate is None else _wide(cot_gate)
        c_b = zero if cot_up is None else _wide(cot_up)
        s2 = sig * (1 - sig) * (2 + a * (1 - 2 * sig))
        d_g = c_a * b * s1 + c_b * a * sig
        d_b = c_a * g * s1
        d_a = g * (c_a * b * s2 + c_b * s1)
        return d_a.to(gate.dtype), d_b.to(up.dtype), d_g.to(grad.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalized in at least fp32; twice differentiable."""
    return _RMSNorm.apply(x, weight, eps)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; twice differentiable."""
    return _SiluGate.apply(gate, up)
