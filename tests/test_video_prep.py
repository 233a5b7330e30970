"""The video pipeline for real: mp4 files written by tools/make_synthetic_videos.py, `ebwm-prep video` on a local Ray
cluster, frame encoders (the offline one and the Stable Diffusion VAE code path), the loader, and a kill + re-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.video import ClipEncoder, VideoPrepConfig, run, video_clips
from ebwm_scale.data.frame_encoders import FrameEncoderConfig, encoder_from_meta
from ebwm_scale.data.loader import ShardLoader, ShardSource
from ebwm_scale.data.shards import META_FILE, VIDEO_FORMAT, ReadError
from tests.conftest import REPO, kill_prep_job_after
from tests.faults import flaky_store

CLIP = {"clip_frames": 8, "frame_gap": 0.125, "image_fps": 16}  # 1 s clips of 8 frames from 16 fps videos


def make_videos(out: Path, num_videos: int, seconds: float = 3.0, *extra: str) -> Path:
    tool = REPO / "tools" / "make_synthetic_videos.py"
    args = ["--num-videos", str(num_videos), "--seconds", str(seconds), "--fps", "16", "--size", "32", *extra]
    subprocess.run([sys.executable, str(tool), str(out), *args], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """10 mp4 files (libx264) of 3 s, an avi (mpeg4) of 2 s, a folder of 24 PNG frames, and a corrupt 'video'."""
    out = make_videos(tmp_path_factory.mktemp("videos"), 10)
    make_videos(out, 1, 2.0, "--codec", "mpeg4", "--container", "avi", "--variant", "ood")
    make_videos(out / "folders", 1, 1.5, "--container", "png", "--seed", "5")
    (out / "broken.mp4").write_bytes(os.urandom(3000))
    return out


def _config(videos, output, **overrides) -> VideoPrepConfig:
    encoder = FrameEncoderConfig(resolution=32, patch_size=4, latent_dim=48)
    fields = dict(inputs=[str(videos)], output=str(output), encoder=encoder, videos_per_chunk=3, val_percent=20)
    return VideoPrepConfig(**{**fields, **CLIP, **overrides})


@pytest.fixture(scope="session")
def video_shards(videos, ray_local, tmp_path_factory):
    cfg = _config(videos, tmp_path_factory.mktemp("video_shards"), shard_mb=0.02)
    run(cfg)
    return cfg


def test_prep_turns_videos_into_latent_shards(video_shards):
    meta = json.loads((Path(video_shards.output) / META_FILE).read_text())
    assert meta["format"] == VIDEO_FORMAT and (meta["clip_frames"], meta["latent_dim"]) == (8, 48)
    counts = meta["counts"]
    # 10 mp4 x 3 clips + 2 s avi x 2 + 24-frame folder (1.5 s) x 1; the corrupt file skipped and counted
    assert counts == {"videos": 12, "clips": 33, "corrupt_videos": 1, "short_videos": 0}
    assert [Path(s["video"]).name for s in meta["skipped"]] == ["broken.mp4"]
    assert meta["splits"]["train"]["samples"] + meta["splits"]["val"]["samples"] == 33
    assert meta["splits"]["val"]["samples"] > 0 and len(meta["splits"]["train"]["shards"]) > 1
    assert meta["encoder"]["id"] == "patch_dct-32px-p4-d48" and min(meta["latents"]["std"]) > 0


def test_loader_yields_standardized_clips_of_the_recorded_shape(video_shards):
    source = ShardSource.open(video_shards.output, "train")
    batch = next(iter(ShardLoader(source, batch_size=4, seed=0, num_workers=0)))
    assert batch["frames"].shape == (4, 8, 48) and batch["frames"].dtype == torch.float32
    everything = np.concatenate([np.stack(source.load(i)) for i in range(len(source.shards))]).reshape(-1, 48)
    everything = everything.astype(np.float64)
    stats = source.meta["latents"]
    assert np.allclose(everything.mean(0), stats["mean"], atol=1e-3)
    assert np.allclose(everything.std(0) / stats["std"], 1, atol=1e-3)


def test_latents_are_the_encoding_of_the_sampled_frames(video_shards, videos):
    """The first train clip equals encoding the frames picked from its video: every 2nd frame (0.125 s at 16 fps)."""
    encoder = encoder_from_meta(json.loads((Path(video_shards.output) / META_FILE).read_text())["encoder"])
    clips = video_clips(str(videos / "train_00000.mp4"), video_shards)
    assert clips.shape == (3, 8, 32, 32, 3)
    import av

    with av.open(str(videos / "train_00000.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert np.array_equal(clips[1][3], decoded[16 + 3 * 2])  # clip 1 starts at 1 s = frame 16
    latents = encoder.encode(clips[0])
    assert latents.shape == (8, 48) and np.allclose(encoder.encode(encoder.decode(latents)), latents, atol=0.02)


def test_a_read_error_is_retried_then_stops_the_job_and_is_never_a_corrupt_video(videos, tmp_path):
    mp4 = next(path for path in sorted(videos.glob("*.mp4")) if path.name != "broken.mp4")
    frames = next((videos / "folders").iterdir())
    cfg = _config(videos, tmp_path / "out", read_backoff_s=0.01)
    expected = [video_clips(str(path), cfg) for path in (mp4, frames)]
    store = flaky_store(2, ".mp4", ".png")
    with pytest.warns(RuntimeWarning, match="Connection reset by peer"):
        got = [video_clips(f"flaky://{path}", cfg) for path in (mp4, frames)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True)) and len(store.failed) > 2
    flaky_store(5, ".mp4")
    threads = torch.get_num_threads()  # the encoder actor, built here in the test process, sets it to 1
    try:
        with pytest.warns(RuntimeWarning), pytest.raises(ReadError, match=rf"{mp4.name} \(5 attempts\)"):
            ClipEncoder(cfg).process(0, [f"flaky://{mp4}"])  # not counted as a corrupt video and skipped
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_rerun_after_kill_gives_the_same_shards(videos, tmp_path):
    args = [
        "--input",
        str(videos),
        "--clip-frames",
        "8",
        "--frame-gap",
        "0.125",
        "--image-fps",
        "16",
        "--resolution",
        "32",
        "--patch-size",
        "4",
        "--latent-dim",
        "48",
        "--videos-per-chunk",
        "1",
        "--val-percent",
        "20",
        "--num-cpus",
        "1",
    ]
    command = [sys.executable, "-m", "data_prep.video", *args, "--output"]
    straight = subprocess.run([*command, str(tmp_path / "a")], capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    num_chunks = len(list((tmp_path / "a" / "_chunks").glob("*.json")))
    assert num_chunks == 13

    done_before = kill_prep_job_after([*command, str(tmp_path / "b")], tmp_path / "b", markers=3)
    assert 3 <= done_before < num_chunks and not (tmp_path / "b" / META_FILE).exists()

    rerun = subprocess.run([*command, str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({num_chunks - done_before} of {num_chunks} chunks run now" in rerun.stdout
    assert json.loads((tmp_path / "b" / META_FILE).read_text())["splits"] == meta["splits"]  # names, counts, sha256


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    vae.save_pretrained(path)


@pytest.mark.slow
def test_stable_diffusion_vae_encoder_from_a_local_path(videos, ray_local, tmp_path):
    """The official code's encoder path (diffusers AutoencoderKL), with a tiny randomly initialised VAE."""
    _tiny_vae(tmp_path / "vae")
    encoder = FrameEncoderConfig(kind="sd_vae", resolution=32, vae_path=str(tmp_path / "vae"))
    cfg = _config(videos / "train_0000[0-1].mp4", tmp_path / "out", encoder=encoder)
    meta = run(cfg)
    assert meta["latent_dim"] == 4 * 16 * 16 and meta["counts"]["clips"] == 6
    assert meta["encoder"] == {"id": "sd_vae-vae-32px", "kind": "sd_vae", "resolution": 32, "vae": "vae"}
    rebuilt = encoder_from_meta(meta["encoder"], vae_path=str(tmp_path / "vae"))
    frames = video_clips(str(videos / "train_00000.mp4"), cfg)[0]
    assert rebuilt.decode(rebuilt.encode(frames)).shape == frames.shape


def test_a_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directory with a diffusers AutoencoderKL"):
        FrameEncoderConfig(kind="sd_vae", vae_path=str(tmp_path / "nowhere")).build()
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.video", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
        + ["--encoder", "sd_vae", "--vae-path", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "nothing is downloaded" in proc.stderr


@pytest.mark.slow
def test_video_models_train_from_prepared_shards_and_ebt_beats_copying_the_last_frame(ray_local, tmp_path):
    """recipes/video_tiny*.yaml end to end: 128 physics videos -> shards -> EBT and AR; after 800 steps the EBT's
    next-frame MSE is below the copy-last-frame baseline's, its loss fell. Measured: 0.246 vs 0.312 alone, 0.305 in
    one full-suite run whose prepared latents differed in the 6th digit (the 800-step outcome moves with such
    differences, so the bound is the baseline itself); AR 0.19."""
    from ebwm_scale.config import load_config
    from ebwm_scale.pretrain import build_trainer
    from tests.conftest import CPU
    from tests.helpers import Recorder

    videos = make_videos(tmp_path / "videos", 128, 8.0)
    shards = tmp_path / "latents"
    encoder = FrameEncoderConfig(resolution=32, patch_size=4, latent_dim=48)
    run(VideoPrepConfig(inputs=[str(videos)], output=str(shards), clip_frames=8, frame_gap=0.25, encoder=encoder))
    results = {}
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    for recipe in ("video_tiny.yaml", "video_tiny_ar.yaml"):
        overrides = [f"data.shards.url={shards}", f"train.output_dir={tmp_path}", f"tracking.uri={tracking}"]
        recorder = Recorder()
        trainer = build_trainer(load_config(REPO / "recipes" / recipe, overrides), CPU, [recorder])
        trainer.fit()
        results[recipe] = (recorder.train[0]["loss"], recorder.train[-1]["loss"], recorder.eval[-1])
    first, last, final = results["video_tiny.yaml"]
    assert last < 0.5 * first and final["mse"] < final["copy_last_mse"]
    first, last, final = results["video_tiny_ar.yaml"]
    assert last < 0.5 * first and final["mse"] < final["copy_last_mse"]

    # The PNG grid of predictions, decoded by the shards' frame encoder, logged to the run's MLflow run.
    png = tmp_path / "predictions.png"
    render = [
        sys.executable,
        str(REPO / "tools" / "render_predictions.py"),
        str(tmp_path / "video_tiny" / "checkpoints"),
    ]
    proc = subprocess.run([*render, str(png), "--latest", "--clips", "3", "--mlflow"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    assert Image.open(png).size == (7 * 34 * 4, 6 * 34 * 4)  # 7 frames x (3 clips x true/predicted), 32 px + gap
    import mlflow

    client = mlflow.MlflowClient(tracking)
    run_id = proc.stdout.split("logged to MLflow run ")[1].split()[0]
    assert [a.path for a in client.list_artifacts(run_id, "predictions")] == [
        "predictions/predictions_step00000800.png"
    ]
