"""Video prep throughput: clips per second per core of `ebwm-prep video`, and how the actors' time splits between
decoding (PyAV, resize, crop) and encoding (the frame encoder).

Writes synthetic mp4 files (tools/make_synthetic_videos.py) to a temp dir, runs the real Ray job on 1 and on all
cores, and prints wall-clock clips/s (Ray start-up included), clips per second of actor time (one actor per core)
and the decode / encode shares of that time.

    python tools/bench_video_prep.py [--num-videos 64] [--seconds 8] [--size 64] [--resolution 64]
        [--encoder patch_dct|sd_vae --vae-path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_prep.common import MARKER_DIR

TOOLS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-videos", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=64, help="pixels of the generated videos")
    parser.add_argument("--resolution", type=int, default=64, help="frames fed to the encoder")
    parser.add_argument("--encoder", default="patch_dct")
    parser.add_argument("--vae-path", default="")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        make = [sys.executable, str(TOOLS / "make_synthetic_videos.py"), str(videos)]
        make += ["--num-videos", str(args.num_videos), "--seconds", str(args.seconds), "--size", str(args.size)]
        subprocess.run(make, check=True, capture_output=True)
        for num_cpus in sorted({1, cores}):
            out = Path(tmp) / f"latents_{num_cpus}"
            command = [sys.executable, "-m", "data_prep.video", "--input", str(videos), "--output", str(out)]
            command += ["--resolution", str(args.resolution), "--encoder", args.encoder, "--num-cpus", str(num_cpus)]
            command += ["--vae-path", args.vae_path] if args.vae_path else []
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            elapsed = time.perf_counter() - start
            clips = json.loads((out / "meta.json").read_text())["counts"]["clips"]
            markers = [json.loads(p.read_text()) for p in (out / MARKER_DIR).glob("*.json")]
            decode = sum(m["seconds"]["decode"] for m in markers)
            encode = sum(m["seconds"]["encode"] for m in markers)
            busy = decode + encode
            print(
                f"{num_cpus} core(s), {args.encoder}: {clips} clips in {elapsed:.1f} s wall (with Ray start-up) = "
                f"{clips / elapsed:.1f} clips/s; {clips / busy:.1f} clips/s per busy core; actor time "
                f"{decode / busy:.0%} decode, {encode / busy:.0%} encode"
            )


if __name__ == "__main__":
    main()
