"""What more than one test file uses: the recipe overrides of tiny runs, trainer runs that record their losses and
gradients, runs under launchers, tensor-parallel layouts, small datasets and models. Test files import these from
here, never from one another (tests/test_architecture.py checks it). Spawning ranks and comparing gradients live in
tests/distributed.py.

The config and the trainer are imported inside the functions that build one: the ranks that the model-level parity
tests spawn import this module too, and need not load them."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import EBTObjective, build_objective
from ebwm_scale.data.shards import TEXT_FORMAT, write_shard
from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
from ebwm_scale.parallel.engines.base import set_lr
from ebwm_scale.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, _shard
from ebwm_scale.train.callbacks import Callback
from ebwm_scale.train.optim import OptimConfig
from tests.conftest import REPO, tiny_model_config
from tests.distributed import record_gradients

# Recipe overrides of tiny runs.
QUIET = ["train.progress_bar=false", "tracking.enabled=false"]
SMALL = [
    "model.dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    *QUIET,
    "train.eval_interval_steps=0",
    "train.eval_batches=2",
]
# A noise-free MCMC start (mcmc.init_scale=0): every chain starts from the same state, so that two ranks, or another
# batching, see what one process sees.
NOISE_FREE = [*SMALL, "data.seq_len=16", "optim.warmup_steps=1", "optim.lr=3e-3", "mcmc.init_scale=0"]
PARITY_STEPS = 5
PARITY = [*NOISE_FREE, f"train.max_steps={PARITY_STEPS}"]
PARITY_RECIPES = ("ci_tiny.yaml", "ci_tiny_ar.yaml")
GRADIENT_RTOL = 2e-4  # fp32: two half-batch sums averaged vs one sum, per tensor relative to its largest entry
# Every random stream on (Langevin noise, random step counts), checkpoints at steps 2, 4 and 6.
NOISY_RESUME = [
    "data.micro_batch_size=4",
    "mcmc.langevin_noise_std=0.05",
    "mcmc.max_num_steps=3",
    "train.max_steps=6",
    "train.checkpoint_interval_steps=2",
]
ON_TEXT_SHARDS = ["model.vocab_size=512", "data.seq_len=32", "data.micro_batch_size=4"]  # conftest's text_shards


class Recorder(Callback):
    def __init__(self):
        self.train, self.eval = [], []

    def on_step_end(self, trainer, step, metrics):
        self.train.append(metrics)

    def on_eval_end(self, trainer, step, metrics):
        self.eval.append(metrics)


def train_recording(recipe, dist, output_dir, *overrides):
    """(trainer, losses, every step's gradients before the optimizer) of a PARITY run of `recipe`."""
    from ebwm_scale.config import load_config
    from ebwm_scale.pretrain import build_trainer

    cfg = load_config(REPO / "recipes" / recipe, [*PARITY, f"train.output_dir={output_dir}", *overrides])
    recorder = Recorder()
    trainer = build_trainer(cfg, dist, [recorder])
    gradients = record_gradients(trainer.engine)
    trainer.fit()
    return trainer, [m["loss"] for m in recorder.train], gradients


def run_recipe_with_gradients(recipe, dist, output_dir, *overrides):
    """(losses, final weights, every step's gradients before the optimizer)."""
    trainer, losses, gradients = train_recording(recipe, dist, output_dir, *overrides)
    params = {k: v.detach().float().clone() for k, v in trainer.engine.model_state_dict().items()}
    return losses, params, gradients


def run_recipe(recipe, dist, output_dir, *overrides):
    """(losses, final weights)."""
    losses, params, _ = run_recipe_with_gradients(recipe, dist, output_dir, *overrides)
    return losses, params


def check_resume_and_export(dist_info, output_dir, *parallel) -> None:
    """Under the `parallel` overrides: a run resumed from its step-4 checkpoint repeats the straight run's losses
    bit for bit (Langevin noise and random step counts on), and the final checkpoint exports to the whole model."""
    from ebwm_scale.inference.export import export_checkpoint, load_exported

    noisy = [*NOISY_RESUME, *parallel]
    straight, params = run_recipe("ci_tiny.yaml", dist_info, f"{output_dir}/a", *noisy)
    checkpoint = f"{output_dir}/a/ci_tiny/checkpoints/step_00000004"
    resumed, _ = run_recipe("ci_tiny.yaml", dist_info, f"{output_dir}/b", *noisy, f"train.resume={checkpoint}")
    assert resumed == straight[4:]
    if dist_info.rank == 0:  # checkpoints hold the whole, unsharded model: it exports and loads on one process
        export_checkpoint(f"{output_dir}/a/ci_tiny/checkpoints/step_00000006", f"{output_dir}/export")
        _, single = load_exported(f"{output_dir}/export")
        assert single.state_dict().keys() == params.keys()
        assert all(torch.equal(single.state_dict()[k], v) for k, v in params.items())


def train_records(run_dir: Path) -> dict[int, tuple[float, ...]]:
    """The last record of every train step in a run's metrics.jsonl (a resumed run repeats the steps after its
    checkpoint): (loss, energy_first, energy_last, alpha)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            by_step[record["step"]] = (record["loss"], record["energy_first"], record["energy_last"], record["alpha"])
    return by_step


# The entry point under launchers: ci_tiny_ar for 5 steps, each a launcher command's argument list.
ENTRY = str(REPO / "ebwm_scale" / "pretrain.py")
LAUNCHED = [
    str(REPO / "recipes" / "ci_tiny_ar.yaml"),
    "model.dim=64",
    "data.seq_len=16",
    "train.max_steps=5",
    *QUIET,
    "train.eval_batches=2",
    "train.log_interval_steps=1",
    "optim.warmup_steps=1",
]


def train_launched(launchers: list[list[str]], out, *overrides, env=None, logs=None) -> tuple[dict, list[float]]:
    """Start every launcher command at once (the nodes of one job) with the entry point and LAUNCHED; returns the
    summary and the per-step training losses (and appends each launcher's output to `logs`)."""
    procs = [
        subprocess.Popen(
            [*launch, ENTRY, *LAUNCHED, *overrides, f"train.output_dir={out}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for launch in launchers
    ]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate()[0] for proc in procs]
        raise AssertionError("a launcher hung:\n" + "\n---\n".join(o[-3000:] for o in outputs)) from None
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    if logs is not None:
        logs += outputs
    run = out / "ci_tiny_ar"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), [r["loss"] for r in rows if r.get("split") == "train"]


def assert_same_curve(got: tuple[dict, list[float]], expected: tuple[dict, list[float]]) -> None:
    (summary, losses), (one_summary, one_losses) = got, expected
    assert len(losses) == len(one_losses) == 5
    for step, (a, b) in enumerate(zip(losses, one_losses), 1):
        assert abs(a - b) < 1e-4 * abs(b), (step, a, b)
    assert abs(summary["eval_loss"] - one_summary["eval_loss"]) < 1e-4 * abs(one_summary["eval_loss"])
    assert summary["tokens"] == one_summary["tokens"] and summary["world_size"] == 2


def two_rank_ladder(tmp_path) -> Path:
    """A ladder of one AR run on 2 data-parallel ranks (2048 tokens); returns its file."""
    path = tmp_path / "ranks.yaml"
    path.write_text(
        f"name: ranks\nbase: {REPO}/recipes/ci_tiny.yaml\nkinds: [ar]\ndata_parallel_ranks: 2\n"
        "sizes:\n  s1: {dim: 32, num_layers: 1, num_heads: 2}\nbudgets: [2048]\n"
        f"output_dir: {tmp_path}/runs\n"
        "overrides: [train.eval_interval_steps=0, train.eval_batches=1, tracking.enabled=false, data.seq_len=16,"
        " data.micro_batch_size=4]\n"
    )
    return path


def tp_dist(rank: int, size: int) -> DistInfo:
    """This CPU rank with every rank in one tensor-parallel group."""
    info = DistInfo(rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu"))
    return with_parallel_groups(info, size)


def expected_shard(module, name, full_grad, rank, size):
    """The slice of the one-process gradient that this rank's shard of `name` must equal."""
    if isinstance(module, ColumnParallelLinear):
        return _shard(full_grad, 0, rank, size, module.blocks)
    if isinstance(module, RowParallelLinear):
        return _shard(full_grad, 1, rank, size)
    if isinstance(module, VocabParallelEmbedding):
        return _shard(full_grad, 0, rank, size)
    return full_grad  # replicated


def parity_batch(modality):
    """3 samples of 9 positions of tiny_model_config's data (seeded)."""
    torch.manual_seed(7)
    return {"tokens": torch.randint(0, 32, (3, 9))} if modality == "text" else {"frames": torch.randn(3, 9, 8)}


def frames_objective(**mcmc_overrides):
    torch.manual_seed(0)
    mcmc = MCMCConfig(**{"num_steps": 2, "alpha_init": 5.0, **mcmc_overrides}).build()
    return EBTObjective(tiny_model_config("ebt", "frames").build(), mcmc)


def trained_frames_objective():
    """A tiny frames EBT trained briefly (40 steps, 2 MCMC steps) on smooth trajectories, whose next frame is
    predictable from the context; and its last batch."""
    objective = frames_objective(alpha_init=2.0)
    optimizer = OptimConfig(lr=3e-3, warmup_steps=1).build(objective, alpha_lr_multiplier=10.0)
    set_lr(optimizer, lambda multiplier: 3e-3 * multiplier)
    torch.manual_seed(0)
    t = torch.arange(7.0)
    for _ in range(40):
        phase = torch.rand(8, 1, 1) * 6
        frames = torch.sin(t[None, :, None] * 0.5 + phase + torch.arange(8.0)[None, None, :])
        objective({"frames": frames}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return objective, frames


NUMBERED_SHARDS = [7, 3, 11, 5, 9, 9]  # 44 samples: a round of 2 or 4 readers x batch 4 leaves 4 or 12 over


def numbered_dataset(
    directory: Path, shard_sizes: list[int], text_format: str = TEXT_FORMAT, numbers_from: int = 0
) -> str:
    """A text dataset whose sample i is the row [n, n, n], n = numbers_from + i: shards of unequal sizes, numbered
    samples, meta.json. The current format stacks a shard's samples in one uint16 array; the first one stored an
    int32 array each."""
    (directory / "train").mkdir(parents=True)
    shards, first = [], 0
    for index, size in enumerate(shard_sizes):
        rows = [np.full(3, numbers_from + i) for i in range(first, first + size)]
        if text_format == TEXT_FORMAT:
            members = [(f"{first:06d}", np.stack(rows).astype(np.uint16))]
        else:
            members = [(f"{first + i:06d}", row.astype(np.int32)) for i, row in enumerate(rows)]
        data = write_shard(members)
        name = f"train/{index:05d}.tar"
        (directory / name).write_bytes(data)
        shards.append({"name": name, "samples": size, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        first += size
    meta = {"format": text_format, "splits": {"train": {"samples": first, "shards": shards}}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


# The official text rule (tests/test_official_rule.py, tests/test_think_options.py): a float64 text EBT, and the energy
# of probability candidates from the literal [time ; real ; predicted] sequence.
OFFICIAL_VOCAB = 23


def official_rule_objective(
    ebt_impl="split", vocab_state="lean", conditioning="time_token", num_steps=3, update_space="probs"
):
    torch.manual_seed(0)
    cfg = tiny_model_config(
        vocab_size=OFFICIAL_VOCAB, ebt_impl=ebt_impl, step_conditioning=conditioning, num_step_embeddings=num_steps
    )
    mcmc = MCMCConfig(num_steps=num_steps, alpha_init=2.0, update_space=update_space, vocab_state=vocab_state)
    objective = build_objective(cfg.build(), mcmc.build()).double()
    with torch.no_grad():  # make the step embeddings matter as much as the token embeddings
        if objective.model.step_embeddings is not None:
            objective.model.step_embeddings.weight.normal_(0, 1)
    return objective


def official_energy(model, ctx: torch.Tensor, probs: torch.Tensor, step: int) -> torch.Tensor:
    """(B, S) energies of the probability candidates, from the literal [time ; real ; predicted] sequence."""
    batch, seq_len = ctx.shape
    parts = [model.tok_embeddings.weight[ctx], probs @ model.vocab_to_embed.weight.t()]
    prefix = 0
    if model.cfg.step_conditioning == "time_token":
        token = model.step_embeddings.weight[min(step, model.cfg.num_step_embeddings - 1)]
        parts.insert(0, token.expand(batch, 1, -1))
        prefix = 1
    elif model.cfg.step_conditioning == "additive":
        parts[1] = parts[1] + model.step_embeddings.weight[min(step, model.cfg.num_step_embeddings - 1)]
    h = torch.cat(parts, dim=1)
    length = prefix + 2 * seq_len
    mask = torch.zeros(length, length, dtype=torch.bool)
    for row in range(prefix + seq_len):  # the time token and the real tokens: causal among themselves
        for col in range(row + 1):
            mask[row, col] = True
    for i in range(seq_len):  # prediction i: the time token, real tokens 0..i, and itself
        row = prefix + seq_len + i
        for col in range(prefix + i + 1):
            mask[row, col] = True
        mask[row, row] = True
    positions = list(range(prefix + seq_len)) + [prefix + i + 1 for i in range(seq_len)]
    h = model.transformer.blocks(h, torch.tensor(positions), mask)
    return model.energy_head(model.transformer.norm(h[:, prefix + seq_len :])).squeeze(-1)
