"""What every prep job shares: input listing, atomic writes, the settings guard, Ray start-up, chunk markers.

A job splits its inputs into numbered chunks; each chunk's shards are written under temp names then renamed, and a
marker `_chunks/chunkNNNNN.json` written last records them. A re-run skips chunks with markers and redoes the
others byte for byte, so a killed job resumes without duplicates or gaps; meta.json is assembled from the markers.
The chunk plan depends on the settings and the input files (url, size, modification time), both recorded when the
directory is started: a re-run that would plan differently is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np

from ebwm_scale.data.shards import SPLITS, write_shard

MARKER_DIR = "_chunks"
SETTINGS_FILE = "_prep_settings.json"


def write_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None


def list_inputs(patterns: list[str], accept: Callable[[str], bool] = lambda path: True) -> list[tuple[str, int]]:
    """(url, size) of every accepted input file (a directory stands for every file below it), sorted, so chunk
    numbering is the same on every run."""
    files = {}
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(c in pattern for c in "*?["):
            matches = fs.glob(pattern)
        elif fs.isdir(path):
            matches = fs.find(path)
        else:
            matches = [path]
        for path in matches:
            if fs.isfile(path) and accept(path):
                files[fs.unstrip_protocol(path)] = fs.size(path)
    if not files:
        raise SystemExit(f"no input files match {patterns}")
    return sorted(files.items())


def _modified(info: dict[str, Any]) -> str:
    """A file's modification stamp as its filesystem reports it (local, s3, gcs, memory), or ""."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def input_manifest(files: list[tuple[str, int]]) -> list[list[Any]]:
    """[url, size, modified] of every input: what the output directory's chunks were planned from."""
    manifest = []
    for url, size in files:
        fs, path = fsspec.core.url_to_fs(url)
        manifest.append([url, size, _modified(fs.info(path))])
    return manifest


def _input_changes(previous: list[list[Any]], current: list[list[Any]]) -> str:
    """The difference between two manifests in a few words ("" when equal)."""
    before, now = {url: rest for url, *rest in previous}, {url: rest for url, *rest in current}
    parts = []
    for what, urls in (
        ("added", sorted(now.keys() - before.keys())),
        ("removed", sorted(before.keys() - now.keys())),
        ("changed (size or modification time)", sorted(u for u in now.keys() & before.keys() if now[u] != before[u])),
    ):
        if urls:
            parts.append(f"{len(urls)} {what}, e.g. {urls[0]}")
    return "; ".join(parts)


def open_output(url: str, settings: dict[str, Any], files: list[tuple[str, int]]) -> tuple[Any, str]:
    """(fs, root) of the output directory. Its chunks are planned from the settings and the input files: a directory
    that already holds finished chunks must have been started with the same of both (else a re-run would mix two
    datasets), one without any is started afresh. Temp files a killed run left behind are removed (no meta.json or
    marker ever lists them)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/{MARKER_DIR}", exist_ok=True)
    manifest = input_manifest(files)
    previous = read_json(fs, f"{root}/{SETTINGS_FILE}")
    if previous is not None:
        if "settings" not in previous:  # written before the inputs were recorded: settings alone
            previous = {"settings": previous, "inputs": manifest}
        changed = sorted(k for k in settings if previous["settings"].get(k) != settings[k])
        difference = _input_changes(previous["inputs"], manifest)
        finished = fs.glob(f"{root}/{MARKER_DIR}/*.json")
        if finished and changed:
            raise SystemExit(f"{url} was prepared with other settings ({', '.join(changed)}); use a new --output")
        if finished and difference:
            raise SystemExit(
                f"the inputs changed since {url} was started ({difference}): a re-run would mix two datasets; "
                "use a new --output, or restore the inputs to finish this one"
            )
        if changed or difference:  # no chunk was finished: what an earlier attempt left was planned otherwise
            for leftover in fs.ls(root, detail=False):
                if not leftover.rstrip("/").endswith(MARKER_DIR):
                    fs.rm(leftover, recursive=True)
    record = {"settings": settings, "inputs": manifest}
    write_atomic(fs, f"{root}/{SETTINGS_FILE}", json.dumps(record, indent=1).encode())
    for stale in fs.glob(f"{root}/**/*.tmp-*"):
        fs.rm(stale)
    return fs, root


def init_ray(ray_address: str, num_cpus: int) -> None:
    """Connect to `ray_address` (or $RAY_ADDRESS) if given, else start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    if ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=ray_address or None, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=False)


def write_split_shards(
    fs, root: str, chunk: int, split: str, samples: Sequence[np.ndarray], per_shard: int, field: str, stacked: bool
) -> list[dict[str, Any]]:
    """One split's samples of one chunk (arrays, or the rows of one array) as shards (temp name, then rename);
    returns their meta.json entries. stacked: a shard is one member holding its samples as one array (text), else
    one member per sample (video)."""
    fs.makedirs(f"{root}/{split}", exist_ok=True)
    entries = []
    for shard_index, start in enumerate(range(0, len(samples), per_shard)):
        name = f"{split}/chunk{chunk:05d}-{shard_index:04d}.tar"
        part = samples[start : start + per_shard]
        if stacked:
            members = [(f"c{chunk:05d}-{start:07d}", np.asarray(part))]
        else:
            members = [(f"c{chunk:05d}-{start + i:07d}", array) for i, array in enumerate(part)]
        data = write_shard(members, field)
        write_atomic(fs, f"{root}/{name}", data)
        entries.append(
            {"name": name, "samples": len(part), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    return entries


def write_marker(fs, root: str, chunk: int, marker: dict[str, Any]) -> dict[str, Any]:
    write_atomic(fs, f"{root}/{MARKER_DIR}/chunk{chunk:05d}.json", json.dumps(marker).encode())
    return marker


def run_chunks(
    fs, root: str, chunk_ids: list[int], process: Callable[[list[int]], Iterator[dict]], description: str
) -> tuple[list[dict], int]:
    """Markers of every chunk in order (reading finished ones, running `process` on the rest, with a progress
    bar), and how many ran now."""
    from rich.progress import Progress

    markers, todo = {}, []
    for chunk in chunk_ids:
        marker = read_json(fs, f"{root}/{MARKER_DIR}/chunk{chunk:05d}.json")
        if marker is None:
            todo.append(chunk)
        else:
            markers[chunk] = marker
    with Progress(disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=len(chunk_ids), completed=len(markers))
        for marker in process(todo):
            markers[marker["chunk"]] = marker
            progress.advance(task)
    return [markers[i] for i in sorted(markers)], len(todo)


def bounded(submit: Callable[[Any], Any], items: Iterable[Any], max_in_flight: int) -> Iterator[Any]:
    """Ray results of submit(item) for every item, as they finish, with at most max_in_flight running."""
    import ray

    pending, in_flight = list(items), []
    while pending or in_flight:
        while pending and len(in_flight) < max_in_flight:
            in_flight.append(submit(pending.pop(0)))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(done[0])


def merge_counts(markers: list[dict]) -> dict[str, Any]:
    """The chunks' counts summed (lists, such as examples, concatenated)."""
    counts: dict[str, Any] = {}
    for marker in markers:
        for key, value in marker["counts"].items():
            counts[key] = counts.get(key, type(value)()) + value
    return counts


def split_entries(markers: list[dict]) -> dict[str, dict[str, Any]]:
    """meta.json's per-split shard lists."""
    splits = {}
    for split in SPLITS:
        shards = [shard for marker in markers for shard in marker["shards"][split]]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    return splits
