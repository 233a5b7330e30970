import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ebwm_scale.config import ConfigError, config_from_text, load_config
from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.data.config import DataConfig, MixtureSourceConfig, ShardsConfig, SyntheticVideoConfig
from ebwm_scale.models.config import ModelConfig, ModelKind
from ebwm_scale.parallel.dist import DataParallel, ParallelConfig
from ebwm_scale.train.checkpoint import CheckpointError
from ebwm_scale.train.config import TrainConfig
from ebwm_scale.train.optim import OptimConfig
from ebwm_scale.train.resume import check_recipe, recipe_changes
from ebwm_scale.train.tracking import TrackingConfig
from tests.helpers import QUIET

RECIPE_DIR = Path(__file__).resolve().parents[1].joinpath("recipes")
RECIPES = sorted([*RECIPE_DIR.glob("*.yaml"), *RECIPE_DIR.glob("official/*.yaml")])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.train.run_name == recipe.stem


@pytest.mark.slow
def test_the_official_pair_is_the_official_small_configuration_and_trains():
    """recipes/official: the xxs size with FFN = dim, official init and optimizer; the EBT and its AR baseline differ
    only in the model kind, and the EBT recipe trains (a few steps at a tiny batch)."""
    ebt, ar = (load_config(RECIPE_DIR / "official" / f"{kind}_nlp_small.yaml") for kind in ("ebt", "ar"))
    m, o = ebt.model, ebt.optim
    assert (m.dim, m.num_layers, m.num_heads, m.resolved_ffn_hidden_dim, m.init) == (384, 6, 6, 384, "official")
    assert (m.step_conditioning, ebt.mcmc.update_space, ebt.mcmc.num_steps) == ("time_token", "probs", 2)
    assert (ebt.mcmc.alpha_init, ebt.mcmc.alpha_lr_multiplier, ebt.data.seq_len) == (500.0, 1500.0, 256)
    assert (o.lr, o.betas, o.decay, o.warmup_steps, o.min_lr_ratio) == (1.2e-3, [0.9, 0.999], "all", 10000, 0.1)
    assert (
        ar.optim == o
        and ar.data == ebt.data
        and vars(ar.train) | {"run_name": ""} == vars(ebt.train) | {"run_name": ""}
    )
    assert {k: v for k, v in vars(ar.model).items() if k != "kind"} == {
        k: v for k, v in vars(m).items() if k not in ("kind", "step_conditioning", "num_step_embeddings")
    } | {"step_conditioning": "none", "num_step_embeddings": ar.model.num_step_embeddings}
    small = ["data.seq_len=16", "data.micro_batch_size=2", "train.max_steps=2", "train.grad_accum_steps=1"]
    small += ["model.num_layers=1", *QUIET, "train.eval_batches=1"]
    done = subprocess.run(
        [
            sys.executable,
            str(RECIPE_DIR.parent / "ebwm_scale" / "pretrain.py"),
            str(RECIPE_DIR / "official" / "ebt_nlp_small.yaml"),
            *small,
            f"train.output_dir={Path(tempfile.mkdtemp())}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_key_and_file(tmp_path):
    path = _recipe(tmp_path, "model:\n  dimm: 64\n")
    message = _error(path)
    assert "unknown key model.dimm" in message and str(path) in message


def test_wrong_type_names_key(tmp_path):
    message = _error(_recipe(tmp_path, "train:\n  max_steps: lots\n"))
    assert message.startswith("train.max_steps:") and "lots" in message


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("model:\n  dim: 100\n  num_heads: 3\n", "model.num_heads=3 does not divide model.dim=100"),
        ("train:\n  max_steps: 0\n", "train.max_steps=0 must be > 0"),
        ("model:\n  kind: diffusion\n", "model.kind='diffusion' is not one of ebt, ar"),
        ("mcmc:\n  vocab_state: fused\n", "mcmc.vocab_state='fused' is not one of lean, plain"),
        ("mcmc:\n  update_space: energy\n", "mcmc.update_space='energy' is not one of probs, logits"),
        ("model:\n  step_conditioning: film\n", "model.step_conditioning='film' is not one of none, additive"),
        (
            "model:\n  step_conditioning: additive\n  num_step_embeddings: 1\n",
            "model.num_step_embeddings=1 is fewer than the MCMC training steps",
        ),
        ("model:\n  ebt_impl: masked\n  attn_impl: sdpa_fused\n", "model.attn_impl='sdpa_fused' has no double"),
        ("model:\n  modality: frames\n", "model.modality='frames' but data.source='stdlib_docs'"),
        ("mcmc:\n  num_steps: 3\n  max_num_steps: 2\n", "mcmc.max_num_steps=2 is below mcmc.num_steps=3"),
        ("optim:\n  betas: [0.9]\n", "optim.betas=[0.9] must be two numbers"),
        ("optim:\n  floor: zero\n", "optim.floor='zero' is not one of per_group, shared"),
        ("parallel:\n  tensor_parallel: 2\n  data_parallel: zero\n", "tensor_parallel=2 with DeepSpeed ZeRO: use"),
        ("parallel:\n  pipeline_parallel: 2\n  data_parallel: fsdp\n", "pipeline_parallel=2 with fsdp: use parallel"),
        ("parallel:\n  shard_optimizer: true\n  data_parallel: fsdp\n", "shard_optimizer=true is ZeRO-1 for parallel"),
        ("parallel:\n  pipeline_parallel: 9\n", "pipeline_parallel=9 exceeds model.num_layers="),
        ("parallel:\n  pipeline_parallel: 2\n  pipeline_microbatches: 5\n", "pipeline_microbatches=5 does not div"),
        ("parallel:\n  pipeline_parallel: 2\nmodel:\n  ebt_impl: masked\n", "needs model.ebt_impl='split'"),
        ("parallel:\n  compile: true\n  data_parallel: fsdp\n", "parallel.compile=true works with parallel.data_"),
        ("parallel:\n  compile: true\nmodel:\n  ebt_impl: masked\n", "compile=true needs model.ebt_impl='split'"),
        ("parallel:\n  backend: nccl\ntrain:\n  device: cpu\n", "parallel.backend=nccl needs train.device=cuda"),
        ("parallel:\n  init_timeout_s: 0\n", "parallel.init_timeout_s=0 must be > 0"),
    ],
)
def test_impossible_values_are_rejected(tmp_path, yaml_text, expected):
    assert expected in _error(_recipe(tmp_path, yaml_text))


def test_overrides_apply_and_are_checked(tmp_path):
    path = _recipe(tmp_path, "train:\n  max_steps: 5\n")
    cfg = load_config(path, ["train.max_steps=7", "model.dim=64", "optim.betas=[0.8,0.9]"])
    assert (cfg.train.max_steps, cfg.model.dim, cfg.optim.betas) == (7, 64, [0.8, 0.9])
    assert "unknown key train.max_stepz" in _error(path, ["train.max_stepz=3"])
    assert "command line" in _error(path, ["train.max_steps=abc"])
    assert "not of the form key.sub=value" in _error(path, ["train.max_steps"])


def test_cli_prints_one_line_config_error(tmp_path):
    path = _recipe(tmp_path, "model:\n  num_heads: 7\n")
    script = shutil.which("ebwm-pretrain")
    assert script, "the ebwm-pretrain console script is not installed (pip install -e .)"
    proc = subprocess.run([script, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"ConfigError: model.num_heads=7 does not divide model.dim=128 ({path})"


def test_step_embeddings_default_to_one_per_training_step(tmp_path):
    recipe = _recipe(tmp_path, "model:\n  step_conditioning: time_token\nmcmc:\n  num_steps: 2\n  max_num_steps: 4\n")
    assert load_config(recipe).model.num_step_embeddings == 4
    assert load_config(recipe, ["model.num_step_embeddings=6"]).model.num_step_embeddings == 6


README = RECIPE_DIR.parent / "README.md"
TABLE_ROWS = {
    "`ddp`": ["parallel.data_parallel=ddp"],
    "`ddp` + `shard_optimizer` (ZeRO-1)": ["parallel.data_parallel=ddp", "parallel.shard_optimizer=true"],
    "`zero`, stage 0-2 (DeepSpeed)": ["parallel.data_parallel=zero", "parallel.zero_stage=2"],
    "`zero`, stage 3 (DeepSpeed)": ["parallel.data_parallel=zero", "parallel.zero_stage=3"],
    "`fsdp`": ["parallel.data_parallel=fsdp"],
}
TABLE_COLUMNS = {
    "alone": [],
    "TP": ["parallel.tensor_parallel=2"],
    "PP": ["parallel.pipeline_parallel=2"],
    "TP × PP": ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"],
    "SP": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "model.step_conditioning=additive"],
    "activation checkpointing": ["parallel.activation_checkpointing=full"],
    "compile": ["parallel.compile=true"],
    "prediction recompute": ["parallel.prediction_recompute=full"],
}


def _combination_table() -> list[tuple[str, str, str]]:
    section = README.read_text().split("### Which combinations work")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    return [(row[0], column, cell) for row in rows for column, cell in zip(header[1:], row[1:], strict=True)]


def test_the_readme_combination_table_is_true():
    """Each ❌ is a one-line config error; each ✅ loads and names a test that exists."""
    table = _combination_table()
    assert {(row, column) for row, column, _ in table} == {(r, c) for r in TABLE_ROWS for c in TABLE_COLUMNS}
    base = ["data.micro_batch_size=4", "parallel.pipeline_microbatches=2"]
    for row, column, cell in table:
        overrides = [*base, *TABLE_ROWS[row], *TABLE_COLUMNS[column]]
        if cell == "❌":
            _error(RECIPE_DIR / "ci_tiny.yaml", overrides)
            continue
        load_config(RECIPE_DIR / "ci_tiny.yaml", overrides)
        named = re.fullmatch(r"✅ `(test_\w+\.py)::(\w+)(?:\[([\w-]+)\])?`", cell)
        assert named, (row, column, cell)
        source = (README.parent / "tests" / named[1]).read_text()
        assert f"def {named[2]}(" in source, cell
        assert named[3] is None or f'"{named[3]}"' in source, cell


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    """deepspeed for ZeRO, s3fs/gcsfs for object-store URLs, ray for the prep jobs: one line naming the pip extra."""
    import importlib.util

    import data_prep.cli

    find_spec = importlib.util.find_spec
    absent = {"deepspeed", "s3fs", "gcsfs", "ray"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))
    from ebwm_scale.config import missing_extra
    from ebwm_scale.pretrain import main

    recipe = RECIPE_DIR / "ci_tiny.yaml"
    zero = load_config(recipe, ["parallel.data_parallel=zero"])  # a recipe loads anywhere; a run needs the extras
    assert missing_extra(zero) == "parallel.data_parallel=zero needs deepspeed: pip install 'ebwm-scale[cluster]'"
    with pytest.raises(ConfigError, match=r"train.checkpoint_dir=s3://bucket/runs needs s3fs: .*ebwm-scale\[s3\]'$"):
        main([str(recipe), "train.checkpoint_dir=s3://bucket/runs"])
    gcs = load_config(recipe, ["data.source=shards", "data.shards.url=gs://bucket/shards"])
    assert "ebwm-scale[gcs]" in missing_extra(gcs)
    with pytest.raises(SystemExit, match=r"ebwm-prep text needs ray: pip install 'ebwm-scale\[prep\]'"):
        data_prep.cli.main(["text", "--input", "x", "--output", "y"])


def test_help_lists_every_recipe_key_and_print_config_round_trips(tmp_path, capsys):
    from ebwm_scale.cli.recipe_help import recipe_keys
    from ebwm_scale.config import PretrainConfig
    from ebwm_scale.pretrain import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    listed = capsys.readouterr().out
    assert done.value.code == 0
    keys = {key for key, _, _, meaning in recipe_keys(PretrainConfig) if meaning}  # every key has a meaning
    assert keys == {key for key, *_ in recipe_keys(PretrainConfig)} >= set(PretrainConfig().flat())
    assert all(f"  {key} " in listed for key in keys)
    assert "  optim.lr" in listed and "float = 0.0003  # peak learning rate (after warmup)" in listed
    with pytest.raises(SystemExit) as done:
        main(["--print-config", str(RECIPE_DIR / "ci_tiny.yaml"), "model.dim=48"])
    printed = capsys.readouterr().out
    assert done.value.code == 0
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml").model.dim == 48


def test_a_choice_loads_from_yaml_and_from_an_override(tmp_path):
    """Choice keys are enums: `kind: ar` in a recipe and model.kind=ar on the command line both give ModelKind.ar."""
    from_yaml = load_config(_recipe(tmp_path, "model:\n  kind: ar\nparallel:\n  data_parallel: fsdp\n"))
    from_override = load_config(RECIPE_DIR / "ci_tiny.yaml", ["model.kind=ar", "parallel.data_parallel=fsdp"])
    for cfg in (from_yaml, from_override):
        assert cfg.model.kind is ModelKind.ar and cfg.parallel.data_parallel is DataParallel.fsdp


def test_a_choice_reads_as_its_plain_value():
    """Log lines, run names, tags, messages and JSON show the value, on every Python >= 3.10 (a plain str-mixin Enum
    prints as ModelKind.ebt in str(), and in f-strings from 3.11 on); it compares and looks up as the string."""
    kind = ModelKind.ebt
    shown = [str(kind), f"{kind}", f"{kind:>4}", format(kind), repr(kind), kind.upper()]
    assert shown == ["ebt", "ebt", " ebt", "ebt", "'ebt'", "EBT"]
    assert type(str(kind)) is str and json.dumps({"kind": kind}) == '{"kind": "ebt"}'
    assert kind == "ebt" and {"ebt": 1}[kind] == 1 and ModelKind.values() == ("ebt", "ar")


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("train:\n  precision: fp16\n", [], "train.precision='fp16' is not one of fp32, bf16 ({path})"),
        (
            "train:\n  max_steps: 5\n",
            ["train.precision=fp16"],
            "train.precision='fp16' is not one of fp32, bf16 (command line: train.precision=fp16)",
        ),
        (
            "parallel:\n  data_parallel: DDP\n",
            [],
            "parallel.data_parallel='DDP' is not one of ddp, zero, fsdp ({path})",
        ),
    ],
)
def test_a_bad_choice_is_one_line_listing_the_choices(tmp_path, yaml_text, overrides, expected):
    path = _recipe(tmp_path, yaml_text)
    assert _error(path, overrides) == expected.format(path=path)


def test_flat_and_to_yaml_hold_choices_as_plain_strings():
    """MLflow params and the resume check read flat(); config.yaml is what a checkpoint and --print-config keep."""
    cfg = load_config(RECIPE_DIR / "ci_tiny.yaml", ["model.kind=ar", "train.precision=bf16"])
    flat = cfg.flat()
    assert (flat["model.kind"], flat["train.precision"]) == ("ar", "bf16")
    assert not [key for key, value in flat.items() if isinstance(value, Enum)]
    text = cfg.to_yaml()
    assert "  kind: ar\n" in text and "  precision: bf16\n" in text and "Kind" not in text
    assert config_from_text(text, "config.yaml") == cfg


def test_a_config_yaml_with_plain_strings_resumes_with_no_recipe_change():
    """A checkpoint saved before the choices were enums holds plain strings in its config.yaml: the same recipe now
    reports no change, and a changed choice is named by its plain values."""
    cfg = load_config(RECIPE_DIR / "ci_tiny.yaml", ["mcmc.update_space=logits", "parallel.data_parallel=fsdp"])
    plain = json.loads(json.dumps(dataclasses.asdict(cfg)))  # no enum types left
    saved_yaml = OmegaConf.to_yaml(OmegaConf.create(plain))
    assert recipe_changes(saved_yaml, 1, cfg, 1) == {}
    now = load_config(RECIPE_DIR / "ci_tiny.yaml", ["parallel.data_parallel=fsdp"])
    changes = recipe_changes(saved_yaml, 1, now, 1)
    assert changes == {"mcmc.update_space": ("logits", "probs")} and type(changes["mcmc.update_space"][1]) is str
    with pytest.raises(CheckpointError, match="mcmc.update_space 'logits' -> 'probs'"):
        check_recipe("ckpt", saved_yaml, 1, now, 1)


SECTION_RULES = [
    (ModelConfig(num_heads=0), "model.num_heads=0 must be > 0"),  # before: ZeroDivisionError
    (ModelConfig(num_heads=3), "model.num_heads=3 does not divide model.dim=128"),
    (MCMCConfig(alpha_min=0), "mcmc.alpha_init=500.0 must exceed mcmc.alpha_min=0 > 0"),
    (OptimConfig(decay_fraction=0), "optim.decay_fraction=0 must lie in (0, 1]"),
    (
        OptimConfig(schedule="wsd", cosine_start="last_warmup_step"),
        "optim.cosine_start=last_warmup_step applies to optim.schedule=cosine only",
    ),
    (DataConfig(source="shards"), "data.source='shards' needs data.shards.url (a directory made by `ebwm-prep text`)"),
    (
        ShardsConfig(url="a", sources=[MixtureSourceConfig(url="b")]),
        "data.shards.url and data.shards.sources are both set: one dataset, or a mixture",
    ),
    (SyntheticVideoConfig(patch_size=5), "data.video.patch_size=5 does not divide frame_size=32"),
    (TrainConfig(resume=""), "train.resume='' must be none, auto or a checkpoint URL"),
    (TrackingConfig(max_buffered_metrics=0), "tracking.max_buffered_metrics=0 must be > 0"),
    (ParallelConfig(zero_stage=4), "parallel.zero_stage=4 is not one of 0, 1, 2, 3"),
]


@pytest.mark.parametrize("section, expected", SECTION_RULES, ids=[type(s).__name__ for s, _ in SECTION_RULES])
def test_each_section_checks_its_own_fields(section, expected):
    assert type(section)().problems() == []
    assert section.problems() == [expected]


def test_rules_across_sections_are_checked_once_the_sections_are_sound():
    """tensor_parallel=3 is a sound parallel section on its own; it does not divide the model's 4 heads."""
    assert ParallelConfig(tensor_parallel=3).problems() == []
    assert _error(RECIPE_DIR / "ci_tiny.yaml", ["parallel.tensor_parallel=3"]).startswith(
        "parallel.tensor_parallel=3 must divide model.num_heads, the FFN width and model.vocab_size"
    )


def test_help_lists_the_values_of_a_choice(capsys):
    from ebwm_scale.pretrain import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert re.search(r"  model\.kind +ebt\|ar = 'ebt'  # ", listed)
    assert re.search(r"  parallel\.data_parallel +ddp\|zero\|fsdp = 'ddp'  # ", listed)
    assert re.search(r"  parallel\.zero_stage +int = 1  # ", listed)
