"""Recipes: YAML -> one typed tree of dataclasses (PretrainConfig), with `a.b=c` overrides from the command line.

OmegaConf does the merging and the type checks against the dataclass schema; `validate` adds the rules that cross
fields. Every problem surfaces as one line naming the key and the file, e.g.
`ConfigError: model.num_heads=7 does not divide model.dim=384 (recipes/nlp_1b.yaml)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.spaces import UPDATE_SPACES, VOCAB_STATES
from ebwm_scale.data.config import DATA_SOURCES, DataConfig
from ebwm_scale.data.text import ByteTokenizer
from ebwm_scale.errors import UserError
from ebwm_scale.extras import needs, url_needs
from ebwm_scale.models.config import (
    ATTENTION_IMPLS,
    DOUBLE_BACKWARD_SAFE_ATTENTION,
    EBT_IMPLS,
    INITS,
    STEP_CONDITIONINGS,
    ModelConfig,
)
from ebwm_scale.parallel.dist import ACTIVATION_CHECKPOINTING, BACKENDS, DATA_PARALLEL_MODES, ParallelConfig
from ebwm_scale.train.config import DEVICES, PRECISIONS, TrainConfig
from ebwm_scale.train.optim import DECAYED, SCHEDULES, OptimConfig
from ebwm_scale.train.resume import flatten
from ebwm_scale.train.tracking import TrackingConfig


class ConfigError(UserError, ValueError):
    """A recipe or override problem; the message is one line that names the key and its source."""


@dataclass(kw_only=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    def flat(self) -> dict[str, object]:
        """{"model.dim": 128, ...} for tracking params."""
        return flatten(asdict(self))


def _describe(error: OmegaConfBaseException) -> str:
    key = error.full_key or "<root>"
    if isinstance(error, ConfigKeyError):
        return f"unknown key {key}"
    return f"{key}: {str(error).splitlines()[0]}"


def _merge(base, update, source: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{_describe(error)} ({source})") from None


def config_from_text(text: str, source: str) -> PretrainConfig:
    """A full config from YAML/JSON text (a saved config.yaml, an export's config.json), checked like a recipe."""
    try:
        loaded = OmegaConf.create(text)
    except Exception as error:
        raise ConfigError(f"cannot parse {source}: {str(error).splitlines()[0]}") from None
    cfg: PretrainConfig = resolve(OmegaConf.to_object(_merge(OmegaConf.structured(PretrainConfig), loaded, source)))
    problem = find_problem(cfg)
    if problem:
        raise ConfigError(f"{problem} ({source})")
    return cfg


def _load_yaml(path: Path, what: str):
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml errors carry several lines; keep the first
        raise ConfigError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what} {path} must be a YAML mapping (key: value lines), not a list")
    if not loaded:
        raise ConfigError(f"{what} {path} is empty: it would train every default; name at least the model")
    return loaded


def _to_object(merged, source: str):
    """The dataclass tree of a merged config; a bad ${...} interpolation is a one-line ConfigError."""
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{_describe(error)} ({source})") from None


def load_structured(schema: type, path: str | Path, what: str):
    """A YAML file read into the dataclass `schema`: unknown keys and wrong types are one-line ConfigErrors."""
    path = Path(path)
    return _to_object(_merge(OmegaConf.structured(schema), _load_yaml(path, what), str(path)), str(path))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Load a recipe, apply `a.b=c` overrides, check everything; raises ConfigError with a one-line message."""
    path = Path(path)
    merged = _merge(OmegaConf.structured(PretrainConfig), _load_yaml(path, "recipe"), str(path))
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ConfigError(f"override {override!r} is not of the form key.sub=value (command line)")
        merged = _merge(merged, OmegaConf.from_dotlist([override]), f"command line: {override}")
    cfg: PretrainConfig = resolve(_to_object(merged, str(path)))
    if not cfg.train.run_name:
        cfg.train.run_name = path.stem
    problem = find_problem(cfg)
    if problem:
        source = f"{path}, overrides: {' '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{problem} ({source})")
    return cfg


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fills what a recipe may leave to be derived: one step embedding per MCMC training step."""
    m, mc = cfg.model, cfg.mcmc
    if m.kind == "ebt" and m.step_conditioning != "none" and m.num_step_embeddings == 0:
        m.num_step_embeddings = max(mc.num_steps, mc.max_num_steps)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str | None:
    return None if value in allowed else f"{key}={value!r} is not one of {', '.join(allowed)}"


def find_problem(cfg: PretrainConfig) -> str | None:
    """The first rule a config breaks, as 'key=value why', or None. Rules that span sections live here."""
    m, mc, o, d, t = cfg.model, cfg.mcmc, cfg.optim, cfg.data, cfg.train
    positive = {
        "model.dim": m.dim,
        "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads,
        "model.vocab_size": m.vocab_size,
        "model.frame_dim": m.frame_dim,
        "mcmc.num_steps": mc.num_steps,
        "data.seq_len": d.seq_len,
        "data.micro_batch_size": d.micro_batch_size,
        "train.max_steps": t.max_steps,
        "train.grad_accum_steps": t.grad_accum_steps,
        "train.log_interval_steps": t.log_interval_steps,
        "train.eval_batches": t.eval_batches,
        "optim.lr": o.lr,
        "model.ffn_multiple_of": m.ffn_multiple_of,
        "train.keep_last_checkpoints": t.keep_last_checkpoints,
        "train.max_bad_steps": t.max_bad_steps,
        "parallel.init_timeout_s": cfg.parallel.init_timeout_s,
        "tracking.max_buffered_metrics": cfg.tracking.max_buffered_metrics,
        "data.shards.read_attempts": d.shards.read_attempts,
    }
    non_negative = {
        "parallel.expected_world_size": cfg.parallel.expected_world_size,
        "optim.weight_decay": o.weight_decay,
        "optim.warmup_steps": o.warmup_steps,
        "optim.grad_clip": o.grad_clip,
        "mcmc.langevin_noise_std": mc.langevin_noise_std,
        "mcmc.alpha_jitter": mc.alpha_jitter,
        "mcmc.init_scale": mc.init_scale,
        "train.eval_interval_steps": t.eval_interval_steps,
        "model.num_step_embeddings": m.num_step_embeddings,
        "model.ffn_hidden_dim": m.ffn_hidden_dim,
        "train.checkpoint_interval_steps": t.checkpoint_interval_steps,
        "train.peak_tflops": t.peak_tflops,
        "data.shards.num_workers": d.shards.num_workers,
        "data.shards.read_backoff_s": d.shards.read_backoff_s,
    }
    checks = [
        _choice("model.kind", m.kind, ("ebt", "ar")),
        _choice("model.modality", m.modality, ("text", "frames")),
        _choice("model.attn_impl", m.attn_impl, ATTENTION_IMPLS),
        _choice("model.ebt_impl", m.ebt_impl, EBT_IMPLS),
        _choice("model.step_conditioning", m.step_conditioning, STEP_CONDITIONINGS),
        _choice("mcmc.update_space", mc.update_space, UPDATE_SPACES),
        _choice("mcmc.vocab_state", mc.vocab_state, VOCAB_STATES),
        _choice("mcmc.loss_on", mc.loss_on, ("all", "last")),
        _choice("optim.schedule", o.schedule, SCHEDULES),
        _choice("optim.decay", o.decay, DECAYED),
        _choice("model.init", m.init, INITS),
        _choice("data.source", d.source, DATA_SOURCES),
        _choice("train.device", t.device, DEVICES),
        _choice("train.precision", t.precision, PRECISIONS),
        _choice("parallel.backend", cfg.parallel.backend, BACKENDS),
        _choice("parallel.data_parallel", cfg.parallel.data_parallel, DATA_PARALLEL_MODES),
        _choice("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, ACTIVATION_CHECKPOINTING),
        *(f"{key}={value} must be > 0" for key, value in positive.items() if value <= 0),
        *(f"{key}={value} must be >= 0" for key, value in non_negative.items() if value < 0),
    ]
    if cfg.parallel.backend == "nccl" and t.device == "cpu":
        checks.append("parallel.backend=nccl needs train.device=cuda (or auto on a GPU machine)")
    if m.dim % max(m.num_heads, 1):
        checks.append(f"model.num_heads={m.num_heads} does not divide model.dim={m.dim}")
    elif (m.dim // m.num_heads) % 2:
        checks.append(f"model.dim / model.num_heads = {m.dim // m.num_heads} must be even for RoPE")
    if m.kind == "ebt" and m.ebt_impl == "masked" and m.attn_impl not in DOUBLE_BACKWARD_SAFE_ATTENTION:
        checks.append(
            f"model.attn_impl={m.attn_impl!r} has no double backward, which model.ebt_impl='masked' needs; use "
            + " or ".join(DOUBLE_BACKWARD_SAFE_ATTENTION)
        )
    if d.modality is not None and m.modality != d.modality:
        checks.append(f"model.modality={m.modality!r} but data.source={d.source!r} provides {d.modality}")
    elif d.source == "stdlib_docs" and m.vocab_size != ByteTokenizer.vocab_size:
        checks.append(f"model.vocab_size={m.vocab_size} but data.source='stdlib_docs' has 256 byte tokens")
    elif d.source == "shards" and not d.shards.url and not d.shards.sources:
        checks.append("data.source='shards' needs data.shards.url (a directory made by `ebwm-prep text`)")
    elif d.shards.url and d.shards.sources:
        checks.append("data.shards.url and data.shards.sources are both set: one dataset, or a mixture")
    elif d.shards.sources and not all(s.url and s.weight > 0 for s in d.shards.sources):
        checks.append("data.shards.sources: every source needs a url and a weight > 0")
    elif d.source == "synthetic_video" and m.frame_dim != d.video.frame_dim:
        checks.append(f"model.frame_dim={m.frame_dim} but data.video gives {d.video.frame_dim}-dim frames")
    if d.video.frame_size % d.video.patch_size:
        checks.append(f"data.video.patch_size={d.video.patch_size} does not divide frame_size={d.video.frame_size}")
    if mc.max_num_steps and mc.max_num_steps < mc.num_steps:
        checks.append(f"mcmc.max_num_steps={mc.max_num_steps} is below mcmc.num_steps={mc.num_steps}")
    if (
        m.kind == "ebt"
        and m.step_conditioning != "none"
        and m.num_step_embeddings < max(mc.num_steps, mc.max_num_steps)
    ):
        checks.append(f"model.num_step_embeddings={m.num_step_embeddings} is fewer than the MCMC training steps")
    if not mc.alpha_init > mc.alpha_min > 0:
        checks.append(f"mcmc.alpha_init={mc.alpha_init} must exceed mcmc.alpha_min={mc.alpha_min} > 0")
    if not 0 < o.decay_fraction <= 1:
        checks.append(f"optim.decay_fraction={o.decay_fraction} must lie in (0, 1]")
    if not 0 <= o.min_lr_ratio <= 1:
        checks.append(f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        checks.append(f"optim.betas={o.betas} must be two numbers in [0, 1)")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        checks.append(f"parallel.zero_stage={cfg.parallel.zero_stage} is not one of 0, 1, 2, 3")
    if cfg.parallel.shard_optimizer and cfg.parallel.data_parallel != "ddp":
        checks.append(
            f"parallel.shard_optimizer=true is ZeRO-1 for parallel.data_parallel=ddp; under "
            f"{cfg.parallel.data_parallel} the optimizer state is already sharded"
        )
    tp = cfg.parallel.tensor_parallel
    if tp < 1:
        checks.append(f"parallel.tensor_parallel={tp} must be >= 1")
    elif tp > 1 and cfg.parallel.data_parallel == "zero":
        checks.append(
            f"parallel.tensor_parallel={tp} with DeepSpeed ZeRO: use parallel.data_parallel=ddp with "
            "parallel.shard_optimizer=true (ZeRO-1 over the data-parallel group) or parallel.data_parallel=fsdp"
        )
    elif tp > 1 and (
        m.num_heads % tp or m.resolved_ffn_hidden_dim % tp or (m.modality == "text" and m.vocab_size % tp)
    ):
        checks.append(f"parallel.tensor_parallel={tp} must divide model.num_heads, the FFN width and model.vocab_size")
    pp, chunks = cfg.parallel.pipeline_parallel, cfg.parallel.pipeline_microbatches
    if pp < 1 or chunks < 1:
        checks.append(f"parallel.pipeline_parallel={pp} and parallel.pipeline_microbatches={chunks} must be >= 1")
    elif pp > 1 and cfg.parallel.data_parallel != "ddp":
        checks.append(
            f"parallel.pipeline_parallel={pp} with {cfg.parallel.data_parallel}: use parallel.data_parallel=ddp "
            "with parallel.shard_optimizer=true (ZeRO-1 over each stage's data-parallel group)"
        )
    elif pp > m.num_layers:
        checks.append(f"parallel.pipeline_parallel={pp} exceeds model.num_layers={m.num_layers}: a stage needs a block")
    elif pp > 1 and d.micro_batch_size % chunks:
        checks.append(f"parallel.pipeline_microbatches={chunks} does not divide data.micro_batch_size")
    elif pp > 1 and m.kind == "ebt" and m.ebt_impl != "split":
        checks.append(f"parallel.pipeline_parallel={pp} needs model.ebt_impl='split' (the stages pass prediction rows)")
    sp = cfg.parallel.sequence_parallel
    if sp and (tp < 2 or pp > 1 or cfg.parallel.data_parallel != "ddp"):
        checks.append(
            "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1, parallel.pipeline_parallel=1 and "
            "parallel.data_parallel=ddp"
        )
    elif sp and d.seq_len % tp:
        checks.append(f"parallel.sequence_parallel=true: parallel.tensor_parallel={tp} does not divide data.seq_len")
    elif sp and m.kind == "ebt" and m.step_conditioning == "time_token":
        checks.append(
            "parallel.sequence_parallel=true cannot split the time token's 1 + data.seq_len context positions evenly "
            "over the ranks; use model.step_conditioning=additive or none"
        )
    if cfg.parallel.compile and (cfg.parallel.data_parallel != "ddp" or tp > 1 or pp > 1):
        checks.append("parallel.compile=true works with parallel.data_parallel=ddp and no tensor/pipeline parallelism")
    elif cfg.parallel.compile and m.kind == "ebt" and m.ebt_impl != "split":
        checks.append("parallel.compile=true needs model.ebt_impl='split' (only its real-token stream is compiled)")
    if cfg.parallel.deepspeed_config and not Path(cfg.parallel.deepspeed_config).is_file():
        checks.append(f"parallel.deepspeed_config={cfg.parallel.deepspeed_config!r}: no such file")
    if not t.resume:
        checks.append("train.resume='' must be none, auto or a checkpoint URL")
    if not 0 < d.val_percent < 100:
        checks.append(f"data.val_percent={d.val_percent} must lie in (0, 100)")
    return next((c for c in checks if c), None)


def missing_extra(cfg: PretrainConfig) -> str | None:
    """What a run of `cfg` needs that is not installed, as one line naming the pip extra (checked when a run starts,
    not when a recipe loads: a recipe with s3:// URLs can be read and printed anywhere)."""
    d, t = cfg.data, cfg.train
    problems = [
        needs("parallel.data_parallel=zero", "cluster", "deepspeed") if cfg.parallel.data_parallel == "zero" else None
    ]
    urls = {"train.checkpoint_dir": t.checkpoint_dir, "train.init_from": t.init_from}
    if t.resume not in ("none", "auto"):
        urls["train.resume"] = t.resume
    if d.source == "shards":
        urls["data.shards.url"] = d.shards.url
        urls |= {f"data.shards.sources[{i}].url": source.url for i, source in enumerate(d.shards.sources)}
    problems += [url_needs(key, url) for key, url in urls.items()]
    return next((problem for problem in problems if problem), None)
