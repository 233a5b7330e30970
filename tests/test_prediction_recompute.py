"""parallel.prediction_recompute: EBT prediction blocks that keep only their inputs through both backwards give the
training step's loss and every gradient of the plain step (float64, 1e-12), keep far fewer bytes for the outer
backward, refuse a third derivative, leave every other call alone, and train on 2 data-parallel ranks like one
process."""

import pytest
import torch

from ebwm_scale.config import ConfigError, load_config
from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.dist import DistInfo, ParallelConfig
from ebwm_scale.parallel.parallelize import parallelize
from ebwm_scale.parallel.recompute import PredictionRecompute
from ebwm_scale.parallel.tensor import state_key
from ebwm_scale.train.metrics import bytes_held_for_backward
from tests.conftest import CPU, REPO, tiny_model_config
from tests.distributed import TRAINER_LOSS_RTOL, assert_gradients_close, run_distributed_test
from tests.helpers import GRADIENT_RTOL, PARITY_STEPS, run_recipe_with_gradients

NUM_LAYERS = 3  # selective wraps blocks 0 and 2: a plain block between two recomputed ones


def _objective(mode, modality="text", model=None, mcmc=None, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = tiny_model_config("ebt", modality, num_layers=NUM_LAYERS, **(model or {}))
    mcmc_cfg = MCMCConfig(**{"num_steps": 2, "alpha_init": 5.0, **(mcmc or {})})
    objective = build_objective(cfg.build(), mcmc_cfg.build()).to(dtype)
    with torch.no_grad():  # step embeddings that matter as much as the token embeddings
        if objective.model.step_embeddings is not None:
            objective.model.step_embeddings.weight.normal_(0, 1)
    return parallelize(objective, ParallelConfig(prediction_recompute=mode))


def _batch(modality):
    torch.manual_seed(1)
    if modality == "text":
        return {"tokens": torch.randint(0, 32, (3, 9))}
    return {"frames": torch.randn(3, 9, 8, dtype=torch.float64)}


def _step(objective, batch):
    """The training step's loss and every gradient, by state_dict name."""
    torch.manual_seed(2)  # the start noise and the Langevin noise
    loss = objective(batch).loss
    loss.backward()
    return loss.item(), {state_key(*name.rsplit(".", 1)): p.grad for name, p in objective.named_parameters()}


CASES = {
    "text": ("text", {}, {}),
    "text-time-token": ("text", {"step_conditioning": "time_token", "num_step_embeddings": 2}, {}),
    "text-logits-plain": ("text", {}, {"update_space": "logits", "vocab_state": "plain"}),
    "text-loss-on-last": ("text", {}, {"loss_on": "last", "num_steps": 3}),
    "text-langevin-random-step-size": ("text", {}, {"langevin_noise_std": 0.1, "step_size_scale": 2.0}),
    "text-undetached-chain": ("text", {"step_conditioning": "additive"}, {"detach_chain": False, "num_steps": 3}),
    "frames": ("frames", {}, {}),
    "frames-undetached-last": ("frames", {}, {"detach_chain": False, "loss_on": "last", "num_steps": 3}),
}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("case", CASES)
def test_recompute_gives_the_plain_step(case, mode):
    modality, model, mcmc = CASES[case]
    plain = _objective("none", modality, model, mcmc)
    recomputed = _objective(mode, modality, model, mcmc)
    wrapped = [isinstance(layer, PredictionRecompute) for layer in recomputed.model.transformer.layers]
    assert wrapped == ([True] * NUM_LAYERS if mode == "full" else [True, False, True])
    assert recomputed.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    loss, grads = _step(plain, _batch(modality))
    loss_recomputed, grads_recomputed = _step(recomputed, _batch(modality))
    assert loss_recomputed == pytest.approx(loss, rel=1e-12)
    assert all(grad is not None for grad in grads.values())
    assert_gradients_close(grads_recomputed, grads, rtol=1e-12)


def test_recompute_keeps_fewer_bytes_for_the_outer_backward():
    """Measured at this size: 10.5 MB plain, 5.2 selective, 2.5 full, which keeps the context stream's graph, the
    B x S x V state and each recomputed block's input and energy gradient per step."""
    torch.manual_seed(1)
    batch = {"tokens": torch.randint(0, 32, (4, 33))}
    held = {
        mode: bytes_held_for_backward(_objective(mode, model={"dim": 64}, dtype=torch.float32), batch)
        for mode in ("none", "selective", "full")
    }
    assert held["full"] < 0.3 * held["none"] and held["full"] < held["selective"] < 0.6 * held["none"], held


def _block_and_inputs():
    torch.manual_seed(0)
    model = tiny_model_config("ebt", "text", num_layers=1).build().double()
    h = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    kv = tuple(torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = model.transformer.rope(torch.arange(1, 6))
    return model.transformer.layers[0], h, cos, sin, kv


def test_a_third_derivative_is_refused():
    block, h, cos, sin, kv = _block_and_inputs()
    wrapped = PredictionRecompute(block)
    (grad,) = torch.autograd.grad(wrapped(h, cos, sin, kv_ctx=kv).pow(2).sum(), h, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), h, retain_graph=True)
    (expected,) = torch.autograd.grad(
        torch.autograd.grad(block(h, cos, sin, kv_ctx=kv).pow(2).sum(), h, create_graph=True)[0].pow(2).sum(), h
    )
    torch.testing.assert_close(second, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="third derivative of a prediction-stream block"):
        torch.autograd.grad(grad.pow(2).sum(), h, create_graph=True)


def test_other_calls_run_the_block_as_it_is():
    """Only training calls of the prediction stream with grad enabled take the Functions: not the context stream,
    not evaluation (which takes gradients without a graph) and not no-grad calls."""
    block, h, cos, sin, kv = _block_and_inputs()
    wrapped = PredictionRecompute(block)
    assert type(wrapped(h, cos, sin, kv_ctx=kv).grad_fn).__name__ == "_BlockForwardBackward"
    plain = block(h, cos, sin, return_kv=True)
    context = wrapped(h, cos, sin, return_kv=True)
    assert type(context[0].grad_fn) is type(plain[0].grad_fn)
    with torch.no_grad():
        assert wrapped(h, cos, sin, kv_ctx=kv).grad_fn is None
    wrapped.eval()
    assert type(wrapped(h, cos, sin, kv_ctx=kv).grad_fn) is type(block(h, cos, sin, kv_ctx=kv).grad_fn)


def test_recompute_under_bf16_autocast_follows_the_plain_step():
    """The recomputes repeat the forward's autocast. bf16 rounds the two differently (bf16 alone moves these
    gradients by ~2 % from fp32)."""
    grads = {}
    for mode in ("none", "full"):
        objective = _objective(mode, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads[mode] = _step(objective, _batch("text"))
    assert grads["full"][0] == pytest.approx(grads["none"][0], rel=1e-3)
    for name, expected in grads["none"][1].items():
        got = grads["full"][1][name]
        assert float((got - expected).norm()) <= 2e-2 * float(expected.norm()), name


DDP_ONLY = "parallel.prediction_recompute=full works with parallel.data_parallel=ddp and no tensor/pipeline"
SPLIT_ONLY = "parallel.prediction_recompute=full needs model.kind=ebt with model.ebt_impl=split"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.data_parallel=fsdp"], DDP_ONLY),
        (["parallel.data_parallel=zero"], DDP_ONLY),
        (["parallel.tensor_parallel=2"], DDP_ONLY),
        (["parallel.pipeline_parallel=2"], DDP_ONLY),
        (["parallel.compile=true"], DDP_ONLY),
        (["parallel.activation_checkpointing=selective"], "with parallel.activation_checkpointing=selective: use one"),
        (["model.kind=ar"], SPLIT_ONLY),
        (["model.ebt_impl=masked"], SPLIT_ONLY),
    ],
)
def test_untested_combinations_are_config_errors(overrides, expected):
    recipe = REPO / "recipes" / "ci_tiny.yaml"
    load_config(recipe, ["parallel.prediction_recompute=full", "parallel.shard_optimizer=true"])
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe, ["parallel.prediction_recompute=full", *overrides])


def _check_two_ranks(rank, world_size, output_dir, expected):
    """ddp, then ddp with ZeRO-1, each with the recompute: the losses and first gradients of one plain process."""
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    ref_losses, ref_gradients = expected
    for sharded in ("false", "true"):
        losses, _, gradients = run_recipe_with_gradients(
            "ci_tiny.yaml",
            dist,
            f"{output_dir}/{sharded}",
            "data.micro_batch_size=4",
            "optim.grad_clip=0",
            "parallel.prediction_recompute=full",
            f"parallel.shard_optimizer={sharded}",
        )
        assert losses == pytest.approx(ref_losses, rel=TRAINER_LOSS_RTOL), sharded
        assert len(gradients) == PARITY_STEPS
        assert_gradients_close(gradients[0], ref_gradients[0], GRADIENT_RTOL)


@pytest.mark.slow
def test_two_ranks_with_recompute_match_one_plain_process(tmp_path):
    one = run_recipe_with_gradients(
        "ci_tiny.yaml", CPU, tmp_path / "one", "data.micro_batch_size=8", "optim.grad_clip=0"
    )
    losses, _, gradients = one
    run_distributed_test(_check_two_ranks, world_size=2, args=(str(tmp_path), (losses, gradients)))
