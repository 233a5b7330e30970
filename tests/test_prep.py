"""The Ray text prep job on a real local Ray, with real sentencepiece and real tar shards."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from data_prep.common import list_inputs
from data_prep.text import Chunk, Piece, TextPrepConfig, make_chunks, read_documents, run
from ebwm_scale.data.shards import META_FILE, read_shard
from ebwm_scale.data.text import is_validation_document
from tests.conftest import kill_prep_job_after


def _shard_samples(root: str, meta: dict, split: str) -> dict[int, list]:
    """chunk -> its samples in key order."""
    by_chunk = defaultdict(list)
    for shard in meta["splits"][split]["shards"]:
        data = Path(root, shard["name"]).read_bytes()
        for key, tokens in read_shard(data):  # one (samples, tokens) member per shard, keyed by its first sample
            chunk, start = key[1:].split("-")
            by_chunk[int(chunk)] += [(int(start) + i, row.tolist()) for i, row in enumerate(tokens)]
    return {c: [t for _, t in sorted(samples)] for c, samples in by_chunk.items()}


def test_shards_decode_to_the_tokenized_input(text_shards):
    cfg = text_shards
    meta = json.loads(Path(cfg.output, META_FILE).read_text())
    processor = spm.SentencePieceProcessor(model_file=str(Path(cfg.output, "tokenizer.model")))
    window = cfg.seq_len + 1
    chunks = make_chunks(
        [(p, os.path.getsize(p)) for p in sorted(map(str, Path(cfg.inputs[0]).parent.glob("*.jsonl")))],
        "auto",
        int(cfg.chunk_mb * 2**20),
    )
    assert meta["tokenizer"]["vocab_size"] == 512 and len(chunks) > 3
    for split in ("train", "val"):
        got = _shard_samples(cfg.output, meta, split)
        for chunk in chunks:
            stream = []
            for doc in read_documents(chunk, "text", {}):
                if is_validation_document(doc, cfg.val_percent) == (split == "val"):
                    stream += processor.encode(doc) + [processor.eos_id()]
            expected = [stream[i : i + window] for i in range(0, len(stream) - window + 1, window)]
            assert got.get(chunk.index, []) == expected, (split, chunk.index)
    assert meta["splits"]["val"]["samples"] > 0 and meta["counts"]["documents"] == 600


def test_jsonl_byte_ranges_split_lines_exactly_once(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * (i % 7 + 1)}) for i in range(200)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chunks = make_chunks([(str(path), path.stat().st_size)], "auto", 97)  # ranges cut lines in the middle
    docs = [doc for chunk in chunks for doc in read_documents(chunk, "text", {})]
    assert docs == [json.loads(line)["text"] for line in lines]


def test_text_parquet_and_bad_jsonl_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    files = [(str(p), p.stat().st_size) for p in sorted(tmp_path.glob("*.txt"))]
    (chunk,) = make_chunks(files, "auto", 2**20)
    assert list(read_documents(chunk, "text", {})) == ["first document", "second document"]
    pq.write_table(pa.table({"content": ["x y", "z"] * 10}), tmp_path / "c.parquet", row_group_size=5)
    chunks = make_chunks([(str(tmp_path / "c.parquet"), 0)], "auto", 2**20)
    assert len(chunks) == 4 and [d for c in chunks for d in read_documents(c, "content", {})] == ["x y", "z"] * 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n{"other": 1}\n{"text": 7}\n')
    counts = {}
    docs = list(read_documents(Chunk(0, "jsonl", (Piece(str(bad), 0, 99),)), "text", counts))
    assert docs == ["ok"] and counts["bad_lines"] == 3
    assert counts["bad_line_examples"] == [f"{bad}:2", f"{bad}:3", f"{bad}:4"]


def test_a_bad_line_among_many_costs_only_itself(tmp_path):
    """Lines are parsed in batches; a batch with a bad line is parsed line by line, so only that line is lost and it
    is named by its line number (valid JSON that is not an object with a string text is bad too)."""
    lines = [json.dumps({"text": f"document {i}"}) for i in range(600)]
    lines[20] += "\r"  # a Windows line end is whitespace
    lines[10], lines[300], lines[301], lines[450] = "", "[1, 2]", '"a string"', '{"text": "cut sho'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    counts = {}
    docs = list(read_documents(Chunk(0, "jsonl", (Piece(str(path), 0, path.stat().st_size),)), "text", counts))
    assert docs == [f"document {i}" for i in range(600) if i not in (10, 300, 301, 450)]  # a blank line is no document
    assert counts["bad_line_examples"] == [f"{path}:301", f"{path}:302", f"{path}:451"] and counts["bad_lines"] == 3


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz"])
def test_compressed_text_and_jsonl_inputs_are_read_whole(tmp_path, suffix):
    """A compressed JSONL file is one chunk (no byte ranges in a compressed stream), read through fsspec's codec."""
    documents = [f"document {i} " * (i % 5 + 1) for i in range(300)]
    jsonl = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
    with fsspec.open(str(tmp_path / f"d.jsonl{suffix}"), "wt", compression="infer") as f:
        f.write(jsonl)
    with fsspec.open(str(tmp_path / f"e.txt{suffix}"), "wt", compression="infer") as f:
        f.write("one plain text document")
    files = list_inputs([str(tmp_path)])
    chunks = make_chunks(files, "auto", 64)  # far smaller than the files: uncompressed JSONL would be cut
    assert [c.input_format for c in chunks] == ["jsonl", "text"]
    assert [d for c in chunks for d in read_documents(c, "text", {})] == [*documents, "one plain text document"]


def test_parquet_input_compressed_with_zstd(tmp_path):
    pq.write_table(pa.table({"text": ["a b c", "d e"] * 50}), tmp_path / "z.parquet", compression="zstd")
    (chunk,) = make_chunks([(str(tmp_path / "z.parquet"), 0)], "auto", 2**20)
    assert list(read_documents(chunk, "text", {})) == ["a b c", "d e"] * 50


def test_inputs_without_a_document_are_an_error(text_shards, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wrong_field.jsonl").write_text('{"content": "a"}\n{"content": "b"}\n')
    cfg = TextPrepConfig(
        inputs=[str(tmp_path / "in")],
        output=str(tmp_path / "out"),
        tokenizer=str(Path(text_shards.output, "tokenizer.model")),
        seq_len=8,
    )
    with pytest.raises(
        SystemExit,
        match=r"no documents in .* \(2 malformed JSONL lines, 0 undecodable files, e.g. .*wrong_field.jsonl:1\)",
    ):
        run(cfg)


def test_text_shards_hold_uint16_tokens_in_one_array(text_shards):
    """2 bytes a token (V = 512), plus one tar member's headers and the archive's padding per shard."""
    meta = json.loads(Path(text_shards.output, META_FILE).read_text())
    assert meta["format"] == "ebwm-scale/text-shards/2" and meta["token_dtype"] == "uint16"
    for shard in meta["splits"]["train"]["shards"]:
        ((_, tokens),) = read_shard(Path(text_shards.output, shard["name"]).read_bytes())
        assert tokens.dtype == "uint16" and tokens.shape == (shard["samples"], text_shards.seq_len + 1)
        assert shard["bytes"] - tokens.nbytes < 512 + 128 + 512 + 10240  # header, npy header, padding, tar record


def test_memory_filesystem_input_and_output(ray_local, stdlib_jsonl):
    fs = fsspec.filesystem("memory")
    fs.pipe("/prep-in/docs.jsonl", Path(stdlib_jsonl, "docs_0.jsonl").read_bytes())
    # Ray tasks run in other processes, which do not share the memory filesystem: only listing and reading the
    # inputs can use it there, so this checks the driver side (chunking) and a single task run in-process.
    (chunk,) = make_chunks([("memory://prep-in/docs.jsonl", fs.size("/prep-in/docs.jsonl"))], "auto", 2**30)
    assert len(list(read_documents(chunk, "text", {}))) == 200
    fs.rm("/prep-in", recursive=True)


@pytest.mark.slow
def test_rerun_after_kill_gives_the_same_shards(stdlib_jsonl, tmp_path):
    args = [
        "--input",
        f"{stdlib_jsonl}/*.jsonl",
        "--vocab-size",
        "512",
        "--seq-len",
        "32",
        "--chunk-mb",
        "0.02",
        "--shard-mb",
        "0.02",
        "--val-percent",
        "10",
        "--num-cpus",
        "1",
        "--max-in-flight",
        "1",
    ]
    straight = subprocess.run(
        [sys.executable, "-m", "data_prep.text", *args, "--output", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    num_chunks = len(list((tmp_path / "a" / "_chunks").glob("*.json")))
    assert num_chunks >= 6

    command = [sys.executable, "-m", "data_prep.text", *args, "--output", str(tmp_path / "b")]
    done_before = kill_prep_job_after(command, tmp_path / "b", markers=3)
    assert 3 <= done_before < num_chunks and not (tmp_path / "b" / META_FILE).exists()

    rerun = subprocess.run(
        [sys.executable, "-m", "data_prep.text", *args, "--output", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"({num_chunks - done_before} of {num_chunks} chunks run now)" in rerun.stdout
    assert json.loads((tmp_path / "b" / META_FILE).read_text())["splits"] == meta["splits"]  # names, counts, sha256
    names = {p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.tar")}
    assert names == {Path(s["name"]) for split in meta["splits"].values() for s in split["shards"]}


def test_changed_settings_are_refused(text_shards):
    with pytest.raises(SystemExit, match="other settings .*seq_len"):
        run(
            TextPrepConfig(
                inputs=text_shards.inputs,
                output=text_shards.output,
                vocab_size=512,
                seq_len=64,
                chunk_mb=0.05,
                shard_mb=0.05,
                val_percent=10,
            )
        )


def test_a_directory_input_means_every_file_below_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "sub" / "b.txt").write_text("two")
    assert [Path(url).name for url, _ in list_inputs([str(tmp_path)])] == ["a.txt", "b.txt"]


def _prep(inputs: list[str], output, **overrides) -> dict:
    settings = dict(vocab_size=512, seq_len=32, chunk_mb=0.05, shard_mb=0.05, val_percent=10)
    return run(TextPrepConfig(inputs=inputs, output=str(output), **{**settings, **overrides}))


def test_a_rerun_after_the_inputs_changed_is_refused_with_the_difference(stdlib_jsonl, ray_local, tmp_path):
    """Chunks are numbered from the input list: finishing a directory from another list would mix two datasets
    (before: a file added to the glob was silently missing and other samples duplicated)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("docs_0.jsonl", "docs_1.jsonl"):
        (inputs / name).write_bytes((stdlib_jsonl / name).read_bytes())
    _prep([f"{inputs}/*.jsonl"], tmp_path / "out")
    (inputs / "docs_2.jsonl").write_bytes((stdlib_jsonl / "docs_2.jsonl").read_bytes())
    with pytest.raises(SystemExit, match=r"inputs changed .*\(1 added, e\.g\. .*docs_2\.jsonl\): a re-run would mix"):
        _prep([f"{inputs}/*.jsonl"], tmp_path / "out")
    (inputs / "docs_2.jsonl").unlink()
    with open(inputs / "docs_1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(SystemExit, match=r"1 changed \(size or modification time\), e\.g\. .*docs_1\.jsonl"):
        _prep([f"{inputs}/*.jsonl"], tmp_path / "out")


def test_a_failed_first_run_leaves_the_directory_rerunnable(stdlib_jsonl, ray_local, tmp_path):
    """An impossible setting fails before any chunk is finished; the corrected command then starts afresh (before:
    the first attempt's settings file refused it)."""
    with pytest.raises(SystemExit, match="sentencepiece cannot train this tokenizer: Vocabulary size too high"):
        _prep([f"{stdlib_jsonl}/*.jsonl"], tmp_path / "out", vocab_size=10**6)
    meta = _prep([f"{stdlib_jsonl}/*.jsonl"], tmp_path / "out")
    assert meta["tokenizer"]["vocab_size"] == 512 and meta["splits"]["train"]["samples"] > 0


def test_too_many_bad_records_stop_the_job_and_are_named(ray_local, tmp_path, capsys):
    """Half the JSONL lines malformed and a binary file among text inputs: counted, named on the console and in
    meta.json, and above --max-bad-fraction the job stops before meta.json (before: exit 0, nothing said)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    lines = [json.dumps({"text": f"document number {i} " * 20}) if i % 2 else f"not json {i}" for i in range(200)]
    (inputs / "half.jsonl").write_text("\n".join(lines) + "\n")
    (inputs / "notes.txt").write_text("a plain text document " * 30)
    (inputs / "image.txt").write_bytes(bytes(range(256)) * 40)
    named = r"e\.g\. .*half\.jsonl:1, .*half\.jsonl:3.*more than --max-bad-fraction 0\.001"
    with pytest.raises(SystemExit, match=r"skipped 100 malformed JSONL lines and 1 undecodable .* 50\.\d+% .*" + named):
        _prep([str(inputs)], tmp_path / "out", vocab_size=400)
    assert not (tmp_path / "out" / META_FILE).exists()
    meta = _prep([str(inputs)], tmp_path / "out", vocab_size=400, max_bad_fraction=0.6)  # finished chunks are kept
    assert meta["counts"]["bad_lines"] == 100 and meta["counts"]["undecodable_documents"] == 1
    assert meta["counts"]["undecodable_examples"] == [(inputs / "image.txt").as_uri()]
    assert meta["counts"]["documents"] == 101
    assert "warning: skipped 100 malformed JSONL lines and 1 undecodable" in capsys.readouterr().out
