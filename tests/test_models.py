import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import EBTObjective
from ebwm_scale.models.blocks import attention
from ebwm_scale.models.ebt import ebt_attention_mask, ebt_positions
from ebwm_scale.models.fused import rms_norm, silu_gate
from tests.conftest import tiny_model_config


def test_ebt_mask_layout():
    expected = torch.tensor(
        [  # r0 r1 r2 p0 p1 p2
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(ebt_attention_mask(3), expected)
    assert ebt_positions(3).tolist() == [0, 1, 2, 1, 2, 3]  # prediction i stands for token i+1


EBT_PATHS = [("masked", "math"), ("masked", "sdpa"), ("split", "math"), ("split", "sdpa"), ("split", "sdpa_fused")]


@pytest.mark.parametrize("modality", ["text", "frames"])
@pytest.mark.parametrize("ebt_impl, attn_impl", EBT_PATHS)
def test_energy_i_depends_only_on_real_prefix_and_own_prediction(modality, ebt_impl, attn_impl):
    torch.manual_seed(0)
    model = tiny_model_config("ebt", modality, ebt_impl=ebt_impl, attn_impl=attn_impl).build().double()
    seq_len, i = 6, 2
    if modality == "text":
        ctx = torch.randint(0, 32, (1, seq_len))
        pred = torch.randn(1, seq_len, 32, dtype=torch.double)
    else:
        ctx = torch.randn(1, seq_len, 8, dtype=torch.double)
        pred = torch.randn(1, seq_len, 8, dtype=torch.double)
    base = model(ctx, pred)[0, i]

    def energy_after(change_ctx_at=None, change_pred_at=None):
        c, p = ctx.clone(), pred.clone()
        if change_ctx_at is not None:
            if modality == "text":
                c[0, change_ctx_at] = (c[0, change_ctx_at] + 1) % 32
            else:
                c[0, change_ctx_at] += 1.0
        if change_pred_at is not None:
            p[0, change_pred_at] += torch.randn_like(p[0, change_pred_at])
        return model(c, p)[0, i]

    for j in range(i + 1, seq_len):  # the future is invisible
        assert torch.allclose(energy_after(change_ctx_at=j), base, atol=1e-12, rtol=0)
    for j in range(seq_len):  # other predictions are invisible
        if j != i:
            assert torch.allclose(energy_after(change_pred_at=j), base, atol=1e-12, rtol=0)
    for j in range(i + 1):  # the real prefix and the own prediction are seen
        assert not torch.allclose(energy_after(change_ctx_at=j), base)
    assert not torch.allclose(energy_after(change_pred_at=i), base)


@pytest.mark.parametrize("modality", ["text", "frames"])
def test_ar_models_are_causal(modality):
    torch.manual_seed(0)
    model = tiny_model_config("ar", modality).build().double()
    x = torch.randint(0, 32, (1, 6)) if modality == "text" else torch.randn(1, 6, 8, dtype=torch.double)
    base = model(x)
    changed = x.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 32 if modality == "text" else changed[0, 4] + 1
    out = model(changed)
    assert torch.allclose(out[0, :4], base[0, :4], atol=1e-12, rtol=0)
    assert not torch.allclose(out[0, 4], base[0, 4])


def _second_order_param_grads(model, ctx, pred):
    """Gradient of a loss on (pred - grad_pred E) w.r.t. the parameters: the EBT training signal."""
    pred = pred.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(ctx, pred).sum(), pred, create_graph=True)
    refined = pred - 0.1 * grad
    params = [p for p in model.parameters()]
    return torch.autograd.grad(refined.pow(2).sum(), params, allow_unused=True)


@pytest.mark.parametrize("modality", ["text", "frames"])
def test_every_attention_path_gives_the_same_energy_and_second_order_gradients(modality):
    """Double backward through each (layout, kernel) pair; all equal the literal 2S masked math reference."""
    torch.manual_seed(0)
    reference = tiny_model_config("ebt", modality, ebt_impl="masked", attn_impl="math").build().double()
    state = reference.state_dict()
    ctx = torch.randint(0, 32, (2, 5)) if modality == "text" else torch.randn(2, 5, 8, dtype=torch.double)
    pred = torch.randn(2, 5, 32 if modality == "text" else 8, dtype=torch.double)
    results = {}
    for ebt_impl, attn_impl in EBT_PATHS:
        model = tiny_model_config("ebt", modality, ebt_impl=ebt_impl, attn_impl=attn_impl).build().double()
        model.load_state_dict(state)
        results[ebt_impl, attn_impl] = (model(ctx, pred), _second_order_param_grads(model, ctx, pred))
    ref_energy, ref_grads = results["masked", "math"]
    named = dict(zip([n for n, _ in reference.named_parameters()], ref_grads))
    assert named["transformer.layers.0.attention.wqkv.weight"].abs().sum() > 0
    for path, (energy, grads) in results.items():
        torch.testing.assert_close(energy, ref_energy, rtol=1e-9, atol=1e-10, msg=str(path))
        for name, g, g_ref in zip(named, grads, ref_grads):
            if g_ref is None:
                assert g is None or not g.abs().sum(), (path, name)
            else:
                torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10, msg=f"{path} {name}")


def test_fused_sdpa_kernel_has_no_double_backward():
    """Why EBT configs refuse attn_impl=sdpa_fused: the CPU flash kernel cannot be differentiated twice."""
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, None, "sdpa_fused")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        gq.sum().backward()


def test_ebt_loss_gradient_matches_finite_differences():
    """float64 gradcheck of the MCMC loss (second order through the energy gradient) w.r.t. weights and alpha.

    One MCMC step: with more, the per-step detach makes autograd's gradient deliberately truncated (the seed
    pseudocode), so finite differences of the whole chain would not match it.
    """
    torch.manual_seed(0)
    model = tiny_model_config("ebt", "text", num_layers=1, dim=16, num_heads=2, vocab_size=12).build().double()
    mcmc = MCMCConfig(num_steps=1, alpha_init=3.0).build().double()
    objective = EBTObjective(model, mcmc)
    tokens = torch.randint(0, 12, (2, 5))
    init = torch.randn(2, 4, 12, dtype=torch.double)
    objective.init_state = lambda ctx: init.clone()  # fixed start so the loss is a deterministic function
    names = ["transformer.layers.0.attention.wqkv.weight", "vocab_to_embed.weight", "energy_head.weight"]
    params = dict(objective.named_parameters())
    checked = [f"model.{n}" for n in names] + ["mcmc.alpha"]

    def loss_of(*values):
        overrides = dict(zip(checked, values))
        out = torch.func.functional_call(objective, {**params, **overrides}, ({"tokens": tokens},))
        return out.loss

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in checked)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def _composed_rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _composed_silu_gate(gate, up):
    return torch.nn.functional.silu(gate) * up


FUSED = [(lambda x, w: rms_norm(x, w, 1e-5), _composed_rms_norm), (silu_gate, _composed_silu_gate)]


@pytest.mark.parametrize("fused, composed", FUSED, ids=["rms_norm", "silu_gate"])
def test_fused_ops_first_and_second_derivatives(fused, composed):
    """Against finite differences, and against autograd of the composed ops when only some first derivatives are
    differentiated further (the cotangents the hand-written second derivative receives as None)."""
    torch.manual_seed(0)
    first = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    second = torch.randn(6 if fused is FUSED[0][0] else (2, 3, 6), dtype=torch.float64, requires_grad=True)
    assert gradcheck(fused, (first, second)) and gradgradcheck(fused, (first, second))
    torch.testing.assert_close(fused(first, second), composed(first, second), rtol=1e-14, atol=1e-14)
    upstream = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    for keep in (0, 1):  # differentiate one first derivative only
        results = []
        for op in (fused, composed):
            grads = torch.autograd.grad(op(first, second), (first, second), upstream, create_graph=True)
            results.append(
                torch.autograd.grad(grads[keep].pow(2).sum(), (first, second, upstream), materialize_grads=True)
            )
        for ours, reference in zip(*results):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused, composed, most", [(*FUSED[0], 2), (*FUSED[1], 3)], ids=["rms_norm", "silu_gate"])
def test_fused_ops_keep_few_tensors_for_the_second_order_graph(fused, composed, most):
    """What the second-order graph keeps of input size: the fused ops keep their inputs and the incoming gradient,
    the composed ops several intermediates more. A third derivative is refused, never silently zero."""

    def saved(op):
        storages = set()

        def pack(tensor):
            if tensor.numel() >= first.numel():
                storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = op(first, second)
            torch.autograd.grad(out, first, torch.randn_like(out).requires_grad_(), create_graph=True)
        return len(storages)

    first = torch.randn(4, 8, 16, requires_grad=True)
    second = torch.randn(16 if most == 2 else (4, 8, 16), requires_grad=True)
    assert saved(fused) <= most < saved(composed) - 2
    out = fused(first, second)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), first, create_graph=True)
    torch.autograd.grad(grad.pow(2).sum(), first, retain_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):  # a graph of the second derivative
        torch.autograd.grad(grad.pow(2).sum(), first, create_graph=True)
