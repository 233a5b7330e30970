"""Data configuration: which dataset, how long the samples are, how they are batched."""

from __future__ import annotations

from dataclasses import dataclass, field

from ebwm_scale.data.sampler import BatchLoader, SampleDataset
from ebwm_scale.data.text import ByteTokenizer, stdlib_docs_splits
from ebwm_scale.data.video import synthetic_video_splits

DATA_SOURCES = ("stdlib_docs", "synthetic_video")


@dataclass(kw_only=True)
class SyntheticVideoConfig:
    num_clips: int = 2048
    num_val_clips: int = 256
    frame_size: int = 32  # pixels, square
    patch_size: int = 4  # frame_dim = (frame_size / patch_size)^2
    max_objects: int = 2

    @property
    def frame_dim(self) -> int:
        return (self.frame_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib_docs"  # stdlib_docs (text, byte tokens) | synthetic_video (frame embeddings)
    seq_len: int = 128  # context length S; every sample holds S + 1 elements
    micro_batch_size: int = 8  # samples per rank per forward
    seed: int = 0
    val_percent: float = 5.0  # text: share of documents held out, chosen by content hash
    cache_dir: str = "~/.cache/ebwm-scale"
    video: SyntheticVideoConfig = field(default_factory=SyntheticVideoConfig)

    @property
    def modality(self) -> str:
        return "text" if self.source == "stdlib_docs" else "frames"

    @property
    def vocab_size(self) -> int:
        return ByteTokenizer.vocab_size

    def build_datasets(self) -> tuple[SampleDataset, SampleDataset, dict[str, str]]:
        """(train, val, description for the run log)."""
        if self.source == "stdlib_docs":
            train, val, sha = stdlib_docs_splits(self.seq_len, self.val_percent, self.cache_dir)
            return train, val, {"corpus": "python stdlib docstrings", "tokenizer": "bytes", "corpus_sha256": sha}
        v = self.video
        train, val = synthetic_video_splits(
            v.num_clips, v.num_val_clips, self.seq_len, v.frame_size, v.patch_size, v.max_objects, self.seed
        )
        return train, val, {"corpus": "synthetic bouncing discs", "encoder": f"patch-mean {v.patch_size}px"}

    def build_loader(self, dataset: SampleDataset, rank: int = 0, world_size: int = 1) -> BatchLoader:
        return BatchLoader(dataset, self.micro_batch_size, self.seed, rank, world_size)
