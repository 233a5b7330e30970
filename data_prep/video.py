"""Videos -> clips of T frames -> frame-encoder latents in WebDataset shards, in parallel with Ray actors.

    ebwm-prep video --input 'videos/*.mp4' --output latents/ [--clip-frames 16 --frame-gap 0.25 --resolution 64]
    python -m data_prep.video ...                                   (same arguments)
    ray submit cluster/ray/cluster.yaml data_prep/video.py -- ...  (on a Ray cluster)

Inputs are fsspec URLs or globs of video files (anything PyAV decodes: mp4, webm, avi, mkv, mov) or of folders of
images (png/jpg, one folder = one video, frames in name order at --image-fps). Each video gives clips of T frames
taken every --frame-gap seconds (default 16 frames 0.25 s apart, as the official EBT video setup), one clip every
--clip-stride seconds (default: back to back). Frames are resized (shorter side) and centre-cropped to the encoder's
resolution and encoded by a frame encoder (ebwm_scale/data/frame_encoders.py) that every Ray actor loads once, on
a GPU per actor when the cluster has GPUs (--gpus-per-actor), else on a CPU core.

As in the text job, videos are grouped into numbered chunks; each chunk's shards are written under temp names and
renamed, then a marker; a re-run skips finished chunks and redoes the rest byte for byte. A video that fails to
decode is skipped and counted (its name is in the chunk marker), as is one too short for a single clip. Videos go
to train or val by a hash of their file name; meta.json records the encoder, T, D, frame gap, counts, the train
latents' mean and std per dimension (the loader standardizes with them) and every shard's sha256.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath

import fsspec
import numpy as np

from data_prep.common import (
    init_ray,
    list_inputs,
    merge_counts,
    open_output,
    run_chunks,
    split_entries,
    write_atomic,
    write_marker,
    write_split_shards,
)
from ebwm_scale.data.frame_encoders import ENCODERS, FrameEncoderConfig
from ebwm_scale.data.shards import LATENTS_KEY, META_FILE, SPLITS, VIDEO_FORMAT, ReadError, read_bytes, retrying
from ebwm_scale.data.text import is_validation_document

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TAR_BYTES_PER_SAMPLE = 1536


@dataclass(kw_only=True)
class VideoPrepConfig:
    inputs: list[str]
    output: str
    clip_frames: int = 16  # T: frames per clip (the model's seq_len + 1)
    frame_gap: float = 0.25  # seconds between the frames of a clip
    clip_stride: float = 0.0  # seconds between clip starts; 0: back to back (T x frame_gap)
    max_clips_per_video: int = 0  # 0: every clip that fits
    image_fps: float = 30.0  # frame rate of image-folder inputs
    encoder: FrameEncoderConfig = field(default_factory=FrameEncoderConfig)
    videos_per_chunk: int = 4
    shard_mb: float = 64.0
    val_percent: float = 5.0
    num_cpus: int = 0  # local Ray: 0 = all cores
    ray_address: str = ""  # "": $RAY_ADDRESS if set, else Ray on this machine; "auto": a running cluster
    num_actors: int = 0  # encoder actors; 0 = one per CPU (or per GPU with --gpus-per-actor 1)
    gpus_per_actor: float = -1.0  # > 0: actors run the encoder on GPUs; 0: on CPUs; -1: 1 if the cluster has GPUs
    read_attempts: int = 5  # a failed read (network error) is tried this often in all, then stops the job
    read_backoff_s: float = 1.0  # wait before the first retry; doubled before each next one

    def settings(self) -> dict:
        """What determines the output bytes: a re-run into the same directory must agree on all of it."""
        keep = ("inputs", "clip_frames", "frame_gap", "clip_stride", "max_clips_per_video", "image_fps")
        keep += ("videos_per_chunk", "shard_mb", "val_percent")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, "encoder": self.encoder.describe()}

    @property
    def stride(self) -> float:
        return self.clip_stride or self.clip_frames * self.frame_gap


def list_media(patterns: list[str]) -> list[tuple[str, int]]:
    """(url, size) of the video files and images the patterns match, sorted."""
    return list_inputs(patterns, lambda path: path.lower().endswith(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS))


def list_videos(media: list[tuple[str, int]]) -> list[str]:
    """URLs of the video files and image folders among the media files, sorted."""
    files = [url for url, _ in media]
    videos = {url for url in files if url.lower().endswith(VIDEO_EXTENSIONS)}
    videos |= {url.rsplit("/", 1)[0] for url in files if url.lower().endswith(IMAGE_EXTENSIONS)}
    return sorted(videos)


def _square(image, resolution: int) -> np.ndarray:
    """PIL image -> (resolution, resolution, 3) uint8: shorter side resized to `resolution`, centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def _timed_frames(url: str, cfg: VideoPrepConfig):
    """(time in seconds, PIL image) of every frame of a video file or image folder, in order. Files are read whole,
    with retries (a failed read is a ReadError, never a 'corrupt video'), and decoded from memory."""
    from PIL import Image

    retry = {"attempts": cfg.read_attempts, "backoff_s": cfg.read_backoff_s}
    if url.lower().endswith(VIDEO_EXTENSIONS):
        import av

        with av.open(io.BytesIO(read_bytes(url, **retry))) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.time is not None:
                    yield frame.time, frame.to_image()
        return
    fs, root = fsspec.core.url_to_fs(url)
    listed = retrying(lambda: fs.ls(root, detail=False), url, **retry)
    names = sorted(p for p in listed if p.lower().endswith(IMAGE_EXTENSIONS))
    for index, name in enumerate(names):
        image = Image.open(io.BytesIO(read_bytes(fs.unstrip_protocol(name), **retry)))
        image.load()
        yield index / cfg.image_fps, image


def video_clips(url: str, cfg: VideoPrepConfig) -> np.ndarray:
    """(clips, T, R, R, 3) uint8: frame t of clip c is the first frame at or after c * stride + t * frame_gap;
    clips that run past the end of the video are dropped."""
    eps = 1e-6
    frames: dict[tuple[int, int], np.ndarray] = {}  # (clip, frame) -> pixels
    pending: list[tuple[float, int, int]] = []  # (time wanted, clip, frame), not yet reached
    num_clips, max_clips = 0, cfg.max_clips_per_video or float("inf")
    for time_s, image in _timed_frames(url, cfg):
        while num_clips < max_clips and num_clips * cfg.stride <= time_s + eps:
            pending += [(num_clips * cfg.stride + t * cfg.frame_gap, num_clips, t) for t in range(cfg.clip_frames)]
            num_clips += 1
        due = [target for target in pending if target[0] <= time_s + eps]
        if due:
            pixels = _square(image, cfg.encoder.resolution)
            for _, clip, t in due:
                frames[(clip, t)] = pixels
            pending = [target for target in pending if target[0] > time_s + eps]
        if num_clips == max_clips and not pending:
            break  # every clip wanted is complete: no need to decode the rest
    complete = [c for c in range(num_clips) if all((c, t) in frames for t in range(cfg.clip_frames))]
    if not complete:
        size = cfg.encoder.resolution
        return np.empty((0, cfg.clip_frames, size, size, 3), dtype=np.uint8)
    return np.stack([np.stack([frames[(c, t)] for t in range(cfg.clip_frames)]) for c in complete])


class ClipEncoder:
    """A Ray actor: loads the frame encoder once, then turns chunks of videos into shards and a marker."""

    def __init__(self, cfg: VideoPrepConfig):
        import torch

        torch.set_num_threads(1)
        self.cfg = cfg
        self.encoder = cfg.encoder.build()

    def process(self, chunk: int, videos: list[str]) -> dict:
        cfg = self.cfg
        fs, root = fsspec.core.url_to_fs(cfg.output)
        counts = {"videos": 0, "clips": 0, "corrupt_videos": 0, "short_videos": 0}
        seconds = {"decode": 0.0, "encode": 0.0}
        latents: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        skipped = []
        for url in videos:
            start = time.perf_counter()
            try:
                clips = video_clips(url, cfg)
            except ReadError:
                raise  # the storage failed, not the file: stop rather than lose the video
            except Exception as error:  # noqa: BLE001 - any decoder failure means "this file is damaged"
                counts["corrupt_videos"] += 1
                skipped.append({"video": url, "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            finally:
                seconds["decode"] += time.perf_counter() - start
            counts["videos"] += 1
            if len(clips) == 0:
                counts["short_videos"] += 1
                continue
            start = time.perf_counter()
            encoded = self.encoder.encode(clips.reshape(-1, *clips.shape[2:])).reshape(len(clips), cfg.clip_frames, -1)
            seconds["encode"] += time.perf_counter() - start
            split = "val" if is_validation_document(PurePosixPath(url).name, cfg.val_percent) else "train"
            latents[split].extend(encoded.astype(np.float16))
            counts["clips"] += len(clips)
        train = np.asarray(latents["train"], dtype=np.float64).reshape(-1, self.encoder.dim)  # (clips x T, D)
        stats = {"count": len(train), "sum": train.sum(0).tolist(), "sum_sq": (train**2).sum(0).tolist()}
        sample_bytes = cfg.clip_frames * self.encoder.dim * 2 + TAR_BYTES_PER_SAMPLE
        per_shard = max(1, int(cfg.shard_mb * 2**20) // sample_bytes)
        shards = {
            split: write_split_shards(fs, root, chunk, split, latents[split], per_shard, LATENTS_KEY, stacked=False)
            for split in SPLITS
        }
        marker = {"chunk": chunk, "counts": counts, "seconds": seconds, "latent_stats": stats, "shards": shards}
        marker.update(skipped=skipped, encoder_id=self.encoder.id, latent_dim=self.encoder.dim)
        return write_marker(fs, root, chunk, marker)


def assemble_meta(cfg: VideoPrepConfig, markers: list[dict], encoder_id: str, latent_dim: int) -> dict:
    count = sum(m["latent_stats"]["count"] for m in markers)
    if count == 0:
        raise SystemExit("no train clips: are the videos shorter than one clip (--clip-frames x --frame-gap)?")
    used = [m["latent_stats"] for m in markers if m["latent_stats"]["count"]]
    mean = np.sum([s["sum"] for s in used], axis=0) / count
    var = np.sum([s["sum_sq"] for s in used], axis=0) / count - mean**2
    return {
        "format": VIDEO_FORMAT,
        "clip_frames": cfg.clip_frames,
        "frame_gap": cfg.frame_gap,
        "clip_stride": cfg.stride,
        "latent_dim": latent_dim,
        "encoder": {"id": encoder_id, **cfg.encoder.describe()},
        "latents": {"dtype": "float16", "mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 1e-12)).tolist()},
        "counts": merge_counts(markers),
        "skipped": [entry for m in markers for entry in m["skipped"]],
        "splits": split_entries(markers),
        "settings": cfg.settings(),
    }


def run(cfg: VideoPrepConfig) -> dict:
    """The whole job; returns meta.json's content."""
    import ray
    from ray.util import ActorPool

    media = list_media(cfg.inputs)
    fs, root = open_output(cfg.output, cfg.settings(), media)
    videos = list_videos(media)
    chunks = [videos[i : i + cfg.videos_per_chunk] for i in range(0, len(videos), cfg.videos_per_chunk)]
    init_ray(cfg.ray_address, cfg.num_cpus)
    started = time.perf_counter()
    resources = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else float(resources.get("GPU", 0) > 0)
    slots = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1)
    num_actors = max(1, min(cfg.num_actors or int(slots), len(chunks)))
    actor_cfg = replace(cfg, encoder=replace(cfg.encoder, device="cuda")) if gpus else cfg
    actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(ClipEncoder)

    def process(todo: list[int]):
        if not todo:
            return iter(())
        pool = ActorPool([actor_class.remote(actor_cfg) for _ in range(min(num_actors, len(todo)))])
        return pool.map_unordered(lambda actor, i: actor.process.remote(i, chunks[i]), todo)

    markers, num_run = run_chunks(fs, root, list(range(len(chunks))), process, "decode + encode + write shards")
    encoder = cfg.encoder.build()  # in the driver too: its id and dimension, also when every chunk was done before
    meta = assemble_meta(cfg, markers, encoder.id, encoder.dim)
    write_atomic(fs, f"{root}/{META_FILE}", json.dumps(meta, indent=1).encode())
    elapsed = time.perf_counter() - started
    counts, train, val = meta["counts"], meta["splits"]["train"], meta["splits"]["val"]
    decode = sum(m["seconds"]["decode"] for m in markers)
    encode = sum(m["seconds"]["encode"] for m in markers)
    print(
        f"prepared {counts['clips']:,} clips of {cfg.clip_frames} x {encoder.dim} from {counts['videos']:,} videos in "
        f"{elapsed:.1f} s ({num_run} of {len(chunks)} chunks run now; {num_actors} actors); skipped "
        f"{counts['corrupt_videos']} corrupt and {counts['short_videos']} short videos; decode {decode:.1f} s, "
        f"encode {encode:.1f} s (actor time); train {train['samples']:,} clips in {len(train['shards'])} shards, "
        f"val {val['samples']:,} in {len(val['shards'])}; {cfg.output}/{META_FILE}"
    )
    return meta


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="ebwm-prep video", description=__doc__.splitlines()[0])
    d, e = VideoPrepConfig(inputs=[], output=""), FrameEncoderConfig()
    parser.add_argument("--input", dest="inputs", nargs="+", required=True, help="fsspec URLs or globs")
    parser.add_argument("--output", required=True, help="dataset directory (fsspec URL)")
    parser.add_argument("--clip-frames", type=int, default=d.clip_frames)
    parser.add_argument("--frame-gap", type=float, default=d.frame_gap, help="seconds between a clip's frames")
    parser.add_argument("--clip-stride", type=float, default=d.clip_stride, help="seconds; 0 = back to back")
    parser.add_argument("--max-clips-per-video", type=int, default=d.max_clips_per_video)
    parser.add_argument("--image-fps", type=float, default=d.image_fps, help="frame rate of image folders")
    parser.add_argument("--encoder", default=e.kind, choices=ENCODERS)
    parser.add_argument("--resolution", type=int, default=e.resolution)
    parser.add_argument("--patch-size", type=int, default=e.patch_size, help="patch_dct")
    parser.add_argument("--latent-dim", type=int, default=e.latent_dim, help="patch_dct")
    parser.add_argument("--vae-path", default=e.vae_path, help="sd_vae: local diffusers AutoencoderKL directory")
    parser.add_argument("--videos-per-chunk", type=int, default=d.videos_per_chunk)
    parser.add_argument("--shard-mb", type=float, default=d.shard_mb)
    parser.add_argument("--val-percent", type=float, default=d.val_percent)
    parser.add_argument("--num-cpus", type=int, default=d.num_cpus, help="local Ray only; 0 = all cores")
    parser.add_argument("--ray-address", default=d.ray_address, help="'auto' on a cluster started by `ray up`")
    parser.add_argument("--num-actors", type=int, default=d.num_actors)
    parser.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="-1: 1 if the cluster has GPUs")
    parser.add_argument("--read-attempts", type=int, default=d.read_attempts, help="tries per file before stopping")
    parser.add_argument("--read-backoff-s", type=float, default=d.read_backoff_s, help="first retry wait, doubled")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    encoder = FrameEncoderConfig(
        kind=args.pop("encoder"),
        resolution=args.pop("resolution"),
        patch_size=args.pop("patch_size"),
        latent_dim=args.pop("latent_dim"),
        vae_path=args.pop("vae_path"),
    )
    cfg = VideoPrepConfig(**args, encoder=encoder)
    if cfg.clip_frames < 2 or cfg.frame_gap <= 0 or cfg.clip_stride < 0 or not 0 < cfg.val_percent < 100:
        raise SystemExit("--clip-frames must be >= 2, --frame-gap > 0, --clip-stride >= 0, --val-percent in (0, 100)")
    if cfg.videos_per_chunk < 1 or cfg.shard_mb <= 0:
        raise SystemExit("--videos-per-chunk must be >= 1 and --shard-mb > 0")
    if cfg.read_attempts < 1 or cfg.read_backoff_s < 0:
        raise SystemExit("--read-attempts must be >= 1 and --read-backoff-s >= 0")
    try:
        cfg.encoder.build()  # a missing VAE or an impossible patch grid fails here, before Ray starts
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"frame encoder: {error}") from None
    run(cfg)


if __name__ == "__main__":
    main()
