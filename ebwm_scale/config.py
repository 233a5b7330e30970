"""Recipes: YAML -> one typed tree of dataclasses (PretrainConfig), with `a.b=c` overrides from the command line.

OmegaConf does the merging and the type checks against the dataclass schema (a choice is an enum, schema.Choice); each
section's `problems()` checks its own fields and `find_problem` adds the rules that span sections. Every problem
surfaces as one line naming the key and the file, e.g.
`ConfigError: model.num_heads=7 does not divide model.dim=384 (recipes/nlp_1b.yaml)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, EnumNode, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.data.config import DataConfig, DataSource
from ebwm_scale.data.text import ByteTokenizer
from ebwm_scale.errors import UserError
from ebwm_scale.extras import needs, url_needs
from ebwm_scale.models.config import EBTImpl, Modality, ModelConfig, ModelKind, StepConditioning
from ebwm_scale.parallel.dist import Backend, DataParallel, ParallelConfig
from ebwm_scale.schema import flatten
from ebwm_scale.train.config import Device, TrainConfig
from ebwm_scale.train.optim import OptimConfig
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
        """{"model.dim": 128, "model.kind": "ebt", ...} for tracking params and the resume check: choices as their
        plain strings, as a saved config.yaml holds them."""
        return {key: value.value if isinstance(value, Enum) else value for key, value in flatten(asdict(self)).items()}


def _describe(error: OmegaConfBaseException) -> str:
    key = error.full_key or "<root>"
    if isinstance(error, ConfigKeyError):
        return f"unknown key {key}"
    if isinstance(error, ValidationError) and isinstance(error.child_node, EnumNode) and error.value is not None:
        allowed = ", ".join(member.value for member in error.child_node.enum_type)
        return f"{key}={error.value!r} is not one of {allowed}"
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
    merged = _merge(OmegaConf.structured(PretrainConfig), loaded, source)
    cfg = resolve(cast(PretrainConfig, OmegaConf.to_object(merged)))
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
    if m.kind == ModelKind.ebt and m.step_conditioning != StepConditioning.none and m.num_step_embeddings == 0:
        m.num_step_embeddings = max(mc.num_steps, mc.max_num_steps)
    return cfg


def find_problem(cfg: PretrainConfig) -> str | None:
    """The first rule a config breaks, as 'key=value why', or None: each section's own rules (its `problems()`), then
    the rules that span sections, which may assume that every section is sound on its own."""
    sections = (cfg.model, cfg.mcmc, cfg.optim, cfg.data, cfg.train, cfg.tracking, cfg.parallel)
    problems = [problem for section in sections for problem in section.problems()]
    return next(iter(problems or _cross_section_problems(cfg)), None)


def _cross_section_problems(cfg: PretrainConfig) -> list[str]:
    m, mc, d, p = cfg.model, cfg.mcmc, cfg.data, cfg.parallel
    ebt = m.kind == ModelKind.ebt
    problems = []
    if p.backend == Backend.nccl and cfg.train.device == Device.cpu:
        problems.append("parallel.backend=nccl needs train.device=cuda (or auto on a GPU machine)")
    if d.modality is not None and m.modality != d.modality:
        problems.append(f"model.modality={m.modality!r} but data.source={d.source!r} provides {d.modality}")
    elif d.source == DataSource.stdlib_docs and m.vocab_size != ByteTokenizer.vocab_size:
        problems.append(f"model.vocab_size={m.vocab_size} but data.source='stdlib_docs' has 256 byte tokens")
    elif d.source == DataSource.synthetic_video and m.frame_dim != d.video.frame_dim:
        problems.append(f"model.frame_dim={m.frame_dim} but data.video gives {d.video.frame_dim}-dim frames")
    conditioned = ebt and m.step_conditioning != StepConditioning.none
    if conditioned and m.num_step_embeddings < max(mc.num_steps, mc.max_num_steps):
        problems.append(f"model.num_step_embeddings={m.num_step_embeddings} is fewer than the MCMC training steps")
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if mc.replay.size and not ebt:
        problems.append(f"mcmc.replay.size={mc.replay.size} needs model.kind=ebt: an AR model has no MCMC chain")
    if pp > 1 and ebt and not (mc.detach_chain or mc.truncate):
        problems.append(
            "mcmc.detach_chain=false with mcmc.loss_on=all needs a backward through every step at once, which "
            "parallel.pipeline_parallel runs step by step: use mcmc.loss_on=last (the official truncated chain)"
        )
    replayed = mc.replay.replayed(d.micro_batch_size)
    if pp > 1 and replayed and (d.micro_batch_size + replayed) % p.pipeline_microbatches:
        problems.append(
            f"parallel.pipeline_microbatches={p.pipeline_microbatches} must divide the micro-batch with its "
            f"{replayed} replayed sequences ({d.micro_batch_size + replayed}; mcmc.replay.sample_fraction)"
        )
    if tp > 1 and (
        m.num_heads % tp or m.resolved_ffn_hidden_dim % tp or (m.modality == Modality.text and m.vocab_size % tp)
    ):
        problems.append(
            f"parallel.tensor_parallel={tp} must divide model.num_heads, the FFN width and model.vocab_size"
        )
    if pp > m.num_layers:
        problems.append(
            f"parallel.pipeline_parallel={pp} exceeds model.num_layers={m.num_layers}: a stage needs a block"
        )
    elif pp > 1 and d.micro_batch_size % p.pipeline_microbatches:
        problems.append(
            f"parallel.pipeline_microbatches={p.pipeline_microbatches} does not divide data.micro_batch_size"
        )
    elif pp > 1 and ebt and m.ebt_impl != EBTImpl.split:
        problems.append(
            f"parallel.pipeline_parallel={pp} needs model.ebt_impl='split' (the stages pass prediction rows)"
        )
    if p.sequence_parallel and d.seq_len % tp:
        problems.append(f"parallel.sequence_parallel=true: parallel.tensor_parallel={tp} does not divide data.seq_len")
    elif p.sequence_parallel and ebt and m.step_conditioning == StepConditioning.time_token:
        problems.append(
            "parallel.sequence_parallel=true cannot split the time token's 1 + data.seq_len context positions evenly "
            "over the ranks; use model.step_conditioning=additive or none"
        )
    if p.prediction_recompute != "none" and not (ebt and m.ebt_impl == EBTImpl.split):
        problems.append(
            f"parallel.prediction_recompute={p.prediction_recompute} needs model.kind=ebt with model.ebt_impl=split "
            "(only that layout has a prediction stream)"
        )
    if p.compile and ebt and m.ebt_impl != EBTImpl.split:
        problems.append("parallel.compile=true needs model.ebt_impl='split' (only its real-token stream is compiled)")
    return problems


def missing_extra(cfg: PretrainConfig) -> str | None:
    """What a run of `cfg` needs that is not installed, as one line naming the pip extra (checked when a run starts,
    not when a recipe loads: a recipe with s3:// URLs can be read and printed anywhere)."""
    d, t = cfg.data, cfg.train
    problems = [
        needs("parallel.data_parallel=zero", "cluster", "deepspeed")
        if cfg.parallel.data_parallel == DataParallel.zero
        else None
    ]
    urls = {"train.checkpoint_dir": t.checkpoint_dir, "train.init_from": t.init_from}
    if t.resume not in ("none", "auto"):
        urls["train.resume"] = t.resume
    if d.source == DataSource.shards:
        urls["data.shards.url"] = d.shards.url
        urls |= {f"data.shards.sources[{i}].url": source.url for i, source in enumerate(d.shards.sources)}
    problems += [url_needs(key, url) for key, url in urls.items()]
    return next((problem for problem in problems if problem), None)
