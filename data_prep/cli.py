"""`ebwm-prep`: the data preparation commands.

ebwm-prep stdlib-docs corpus/                 write Python's stdlib docstrings as JSONL (a corpus on every machine)
ebwm-prep text --input ... --output ...       tokenize text into shards (see `ebwm-prep text --help`)
ebwm-prep video --input ... --output ...      encode video clips into latent shards (see `ebwm-prep video --help`)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep import text, video
from ebwm_scale.data.text import corpus_documents
from ebwm_scale.errors import run_cli
from ebwm_scale.extras import needs


def stdlib_docs(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ebwm-prep stdlib-docs", description="the shipped Python stdlib docstring corpus as JSONL"
    )
    parser.add_argument("output", help="directory; gets stdlib_docs.jsonl")
    parser.add_argument("--num-files", type=int, default=4, help="split the documents over this many files")
    args = parser.parse_args(argv)
    documents = [doc["text"] for doc in corpus_documents()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(args.num_files):
        with open(out / f"stdlib_docs_{index}.jsonl", "w", encoding="utf-8") as f:
            for doc in documents[index :: args.num_files]:
                f.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {len(documents):,} documents to {out}/stdlib_docs_*.jsonl")


COMMANDS = {"text": text.main, "video": video.main, "stdlib-docs": stdlib_docs}
# what each command imports from the [prep] extra (pyarrow only for parquet inputs, zstandard only for .zst)
PREP_MODULES = {"text": ("ray",), "video": ("ray", "av", "PIL")}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command = argv[0]
    problem = needs(f"ebwm-prep {command}", "prep", *PREP_MODULES.get(command, ()))
    if problem:
        sys.exit(problem)
    COMMANDS[command](argv[1:])


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
