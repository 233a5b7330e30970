"""Data configuration: which dataset, how long the samples are, how they are batched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ebwm_scale.data.loader import ShardLoader, ShardSamples, ShardSource
from ebwm_scale.data.mixture import Mixture, MixtureLoader, MixtureSamples
from ebwm_scale.data.sampler import BatchLoader, SampleDataset
from ebwm_scale.data.shards import VIDEO_FORMAT, ShardFormatError
from ebwm_scale.data.text import ByteTokenizer, stdlib_docs_splits
from ebwm_scale.data.video import synthetic_video_splits
from ebwm_scale.schema import Choice, non_negative, positive


class DataSource(Choice):
    stdlib_docs = "stdlib_docs"
    synthetic_video = "synthetic_video"
    shards = "shards"


class ModelShape(Protocol):
    """What the data must fit (the model config's fields, read only); data code never imports the models."""

    @property
    def modality(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def frame_dim(self) -> int: ...


TrainSet = SampleDataset | ShardSource | Mixture  # what build_loader streams batches from


@dataclass(kw_only=True)
class SyntheticVideoConfig:
    num_clips: int = 2048  # training clips generated
    num_val_clips: int = 256  # validation clips generated
    frame_size: int = 32  # pixels, square
    patch_size: int = 4  # frame_dim = (frame_size / patch_size)^2
    max_objects: int = 2  # moving discs per clip, at most

    @property
    def frame_dim(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "data.video", "patch_size")
        if not problems and self.frame_size % self.patch_size:
            problems.append(f"data.video.patch_size={self.patch_size} does not divide frame_size={self.frame_size}")
        return problems


@dataclass(kw_only=True)
class MixtureSourceConfig:
    url: str = ""  # a dataset directory made by `ebwm-prep text|video`
    weight: float = 1.0  # its share of the samples, relative to the other sources' weights


@dataclass(kw_only=True)
class ShardsConfig:
    url: str = ""  # a dataset directory made by `ebwm-prep text` or `ebwm-prep video` (any fsspec URL)
    # Instead of url: several datasets (same tokenizer or frame encoder) mixed sample by sample by weight, e.g.
    # [{url: s3://web, weight: 0.7}, {url: s3://code, weight: 0.3}] (data/mixture.py)
    sources: list[MixtureSourceConfig] = field(default_factory=list)
    num_workers: int = 2  # DataLoader workers per rank (0: read in the training process)
    read_attempts: int = 5  # a failed shard read (network error) is tried this often in all, then stops the run
    read_backoff_s: float = 1.0  # wait before the first retry; doubled before each next one

    @property
    def urls(self) -> list[str]:
        """Every dataset this run reads (the first one's tokenizer is every one's)."""
        return [source.url for source in self.sources] if self.sources else [self.url]

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "data.shards", "read_attempts")
        problems += non_negative(self, "data.shards", "num_workers", "read_backoff_s")
        if self.url and self.sources:
            problems.append("data.shards.url and data.shards.sources are both set: one dataset, or a mixture")
        elif self.sources and not all(s.url and s.weight > 0 for s in self.sources):
            problems.append("data.shards.sources: every source needs a url and a weight > 0")
        return problems


@dataclass(kw_only=True)
class DataConfig:
    # stdlib_docs (text, byte tokens) | synthetic_video (frame embeddings) | shards (`ebwm-prep text|video` output)
    source: DataSource = DataSource.stdlib_docs
    seq_len: int = 128  # context length S; every sample holds S + 1 elements
    micro_batch_size: int = 8  # samples per rank per forward
    seed: int = 0  # data order (shard and sample shuffles) and synthetic data
    val_percent: float = 5.0  # text: share held out, chosen by a hash of each document's module (shards: of its text)
    video: SyntheticVideoConfig = field(default_factory=SyntheticVideoConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    @property
    def modality(self) -> str | None:
        """text | frames; None for shards, whose meta.json says (checked when they are opened)."""
        return {"stdlib_docs": "text", "synthetic_video": "frames"}.get(self.source)

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(self, "data", "seq_len", "micro_batch_size")
        if self.source == DataSource.shards and not self.shards.url and not self.shards.sources:
            problems.append("data.source='shards' needs data.shards.url (a directory made by `ebwm-prep text`)")
        if not 0 < self.val_percent < 100:
            problems.append(f"data.val_percent={self.val_percent} must lie in (0, 100)")
        return problems + self.shards.problems() + self.video.problems()

    def build_datasets(self, model: ModelShape) -> tuple[TrainSet, SampleDataset | ShardSamples | MixtureSamples, dict]:
        """(train, val, description for the run log); the data must fit the `model` (vocabulary, frame size)."""
        if self.source == "shards":
            attempts, backoff = self.shards.read_attempts, self.shards.read_backoff_s
            trains = [ShardSource.open(url, "train", attempts, backoff) for url in self.shards.urls]
            for source in trains:
                self._check_shards_fit(source.meta, source.url, model)
            train = trains[0]
            if train.modality == "text":
                described = f"sentencepiece {train.meta['tokenizer']['sha256'][:12]}"
                info = {"shards": ", ".join(self.shards.urls), "tokenizer": described}
            else:
                info = {"shards": ", ".join(self.shards.urls), "encoder": train.meta["encoder"]["id"]}
            vals = [ShardSamples(ShardSource.open(url, "val", attempts, backoff)) for url in self.shards.urls]
            if not self.shards.sources:
                info["train_samples"] = str(len(train))
                return train, vals[0], info
            _check_same_inputs(trains)
            weights = [source.weight for source in self.shards.sources]
            info["train_samples"] = " + ".join(str(len(t)) for t in trains)
            info["mixture"] = ", ".join(
                f"mixture/{i} = {t.url} ({w:g})" for i, (t, w) in enumerate(zip(trains, weights))
            )
            return Mixture(trains, weights), MixtureSamples(vals, weights), info
        if model.vocab_size != ByteTokenizer.vocab_size and self.source == "stdlib_docs":
            raise ShardFormatError(f"data.source=stdlib_docs has 256 byte tokens, model.vocab_size={model.vocab_size}")
        if self.source == "stdlib_docs":
            docs, val_docs, sha = stdlib_docs_splits(self.seq_len, self.val_percent)
            return (
                docs,
                val_docs,
                {"corpus": "python stdlib docstrings", "tokenizer": "bytes", "corpus_sha256": sha},
            )
        v = self.video
        clips, val_clips = synthetic_video_splits(
            v.num_clips, v.num_val_clips, self.seq_len, v.frame_size, v.patch_size, v.max_objects, self.seed
        )
        return clips, val_clips, {"corpus": "synthetic bouncing discs", "encoder": f"patch-mean {v.patch_size}px"}

    def _check_shards_fit(self, meta: dict, url: str, model: ModelShape) -> None:
        video = meta["format"] == VIDEO_FORMAT
        if (model.modality == "frames") != video:
            held = "video frame latents" if video else "text tokens"
            raise ShardFormatError(f"the shards at {url} hold {held}, model.modality={model.modality!r}")
        if video and (meta["clip_frames"] != self.seq_len + 1 or meta["latent_dim"] != model.frame_dim):
            raise ShardFormatError(
                f"the shards at {url} hold clips of {meta['clip_frames']} frames x {meta['latent_dim']} dims; set "
                f"data.seq_len={meta['clip_frames'] - 1} model.frame_dim={meta['latent_dim']} "
                f"(now {self.seq_len}, {model.frame_dim})"
            )
        if not video and (meta["tokenizer"]["vocab_size"] != model.vocab_size or meta["seq_len"] != self.seq_len):
            raise ShardFormatError(
                f"the shards at {url} hold seq_len {meta['seq_len']} and a "
                f"{meta['tokenizer']['vocab_size']}-token vocabulary; set data.seq_len={meta['seq_len']} "
                f"model.vocab_size={meta['tokenizer']['vocab_size']} (now {self.seq_len}, {model.vocab_size})"
            )

    def build_loader(self, dataset: TrainSet, rank: int = 0, world_size: int = 1):
        if isinstance(dataset, Mixture):
            return MixtureLoader(
                dataset.sources,
                dataset.weights,
                self.micro_batch_size,
                self.seed,
                rank,
                world_size,
                self.shards.num_workers,
            )
        if isinstance(dataset, ShardSource):
            return ShardLoader(dataset, self.micro_batch_size, self.seed, rank, world_size, self.shards.num_workers)
        return BatchLoader(dataset, self.micro_batch_size, self.seed, rank, world_size)


def _check_same_inputs(sources: list[ShardSource]) -> None:
    """Mixed datasets must mean the same by a token id (one tokenizer) or a latent (one frame encoder)."""

    def made_with(source: ShardSource) -> str:
        meta = source.meta
        return meta["tokenizer"]["sha256"] if source.modality == "text" else meta["encoder"]["id"]

    first = made_with(sources[0])
    for source in sources[1:]:
        if made_with(source) != first:
            what = "tokenizer" if source.modality == "text" else "frame encoder"
            raise ShardFormatError(
                f"data.shards.sources: {source.url} was made with another {what} than {sources[0].url}; a mixture "
                "needs one (prepare it with --tokenizer pointing at the first dataset's tokenizer.model)"
            )
