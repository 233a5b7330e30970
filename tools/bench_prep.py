"""Throughput of the Ray text prep job against raw single-core sentencepiece, on the same text.

Prints pipeline tokens/s (reading, tokenizing, packing, writing and renaming shards, meta.json), raw
`SentencePieceProcessor.encode` tokens/s on one core, and pipeline / (cores x raw); goal >= 0.8. Each is the best of
--repeats runs (a one-second job on a shared 2-core box varies by +-5 %). The corpus is Python's stdlib docstrings,
copied --copies times into JSONL files. The tokenizer is trained beforehand (a fixed cost, not throughput; timed with
one trainer thread and with the default number), and Ray is started and its worker processes have imported the job's
modules before the clock (on a cluster they are long-lived; here their ~1 s import of torch, via webdataset, would
dominate a small corpus).

    python tools/bench_prep.py [--copies 8] [--num-cpus 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
import sentencepiece as spm

from data_prep.text import TextPrepConfig, run, train_tokenizer
from ebwm_scale.data.text import corpus_documents


@ray.remote(num_cpus=1)
def _warm_up() -> None:
    import data_prep.text  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="corpus size: copies of the ~1.3 MB docstring set")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs, raw and pipeline alike")
    args = parser.parse_args()

    documents = [doc["text"] for doc in corpus_documents()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus")
        corpus.mkdir()
        all_docs = []
        for copy in range(args.copies):  # a suffix per copy keeps documents distinct
            docs = [f"{doc}\n(copy {copy})" for doc in documents]
            all_docs += docs
            with open(corpus / f"docs_{copy:03d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
        base = TextPrepConfig(
            inputs=[f"{corpus}/*.jsonl"],
            output="",
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            seq_len=args.seq_len,
            chunk_mb=2.0,
            shard_mb=16.0,
            num_cpus=args.num_cpus,
        )
        training = {}
        for threads in (1, base.tokenizer_threads):
            start = time.perf_counter()
            model = train_tokenizer(documents, TextPrepConfig(**{**base.__dict__, "tokenizer_threads": threads}))
            training[threads] = time.perf_counter() - start
        tokenizer = Path(tmp, "tok.model")
        tokenizer.write_bytes(model)

        processor = spm.SentencePieceProcessor(model_file=str(tokenizer), num_threads=1)
        raw_runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            raw_tokens = sum(len(processor.encode(doc)) for doc in all_docs)
            raw_runs.append(raw_tokens / (time.perf_counter() - start))

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        cores = int(ray.cluster_resources()["CPU"])
        ray.get([_warm_up.remote() for _ in range(4 * cores)])
        pipeline_runs = []
        for repeat in range(args.repeats):  # each into a new directory: a whole job every time
            output = str(Path(tmp, f"shards{repeat}"))
            cfg = TextPrepConfig(**{**base.__dict__, "output": output, "tokenizer": str(tokenizer)})
            start = time.perf_counter()
            meta = run(cfg)
            pipeline_runs.append(meta["counts"]["tokens"] / (time.perf_counter() - start))
        ray.shutdown()

    size_mb = sum(len(d.encode()) for d in all_docs) / 2**20
    raw_tps, pipeline_tps = max(raw_runs), max(pipeline_runs)
    print(f"corpus: {len(all_docs):,} documents, {size_mb:.1f} MB, {raw_tokens:,} tokens")
    trained = ", ".join(f"{threads} thread(s) {seconds:.2f} s" for threads, seconds in training.items())
    print(f"tokenizer training ({args.vocab_size:,} {base.model_type} pieces, 1.3 MB of text): {trained}")
    print(f"raw sentencepiece, 1 core: {raw_tps:,.0f} tokens/s (best of {', '.join(f'{r:,.0f}' for r in raw_runs)})")
    runs = ", ".join(f"{r:,.0f}" for r in pipeline_runs)
    print(f"ray pipeline, {cores} cores:  {pipeline_tps:,.0f} tokens/s (best of {runs})")
    print(f"pipeline / (cores x raw) = {pipeline_tps / (cores * raw_tps):.3f}  (goal >= 0.8)")


if __name__ == "__main__":
    main()
