"""Regenerate the text corpus shipped in ebwm_scale/data/assets/ from this interpreter's standard library.

The repository ships its result, so every user trains on the same bytes whatever their Python; run this only to
change the corpus on purpose (then re-record tests/assets/golden_losses.json). Writes:

    stdlib_docs.jsonl.gz  one JSON record per docstring, {"id": "json/decoder.py:JSONDecoder.decode", "text": ...},
                          docstrings of at least MIN_DOC_CHARS, standard-library modules only (no tests), in path order.
                          A paragraph (text between blank lines) is kept only where it first appears: later copies are
                          cut from their docstrings, so no paragraph is shared by two documents and no split of the
                          documents can put the same paragraph on both sides.
    stdlib_code.txt.gz    the top-level modules' code with docstrings removed, the first CODE_BYTES: out-of-distribution
                          text for a model trained on the docstrings (ebwm-eval).
    corpus.json           the sha256 of each file's decompressed content, counts, and the Python that produced them.

    python tools/make_text_corpus.py [--out ebwm_scale/data/assets]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

from ebwm_scale.data.text import CODE_FILE, CORPUS_FILE, MANIFEST_FILE, MIN_DOC_CHARS, PARAGRAPH_SEPARATOR

CODE_BYTES = 1 << 20
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None  # a few stdlib files are test fixtures with deliberate errors


def _named_docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module ("<module>"), its classes and functions, in source order."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    found.append((name, doc))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    module_doc = ast.get_docstring(tree)
    if module_doc:
        found.append(("<module>", module_doc))
    visit(tree, "")
    return found


def stdlib_documents(root: Path) -> list[dict[str, str]]:
    """Every long docstring of the standard library's own modules, with repeated paragraphs cut (module docstring)."""
    seen_paragraphs: set[str] = set()
    documents, seen_ids = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS.intersection(relative.parts) or (tree := _parse(path)) is None:
            continue
        for name, doc in _named_docstrings(tree):
            kept = []
            for paragraph in doc.split(PARAGRAPH_SEPARATOR):
                if paragraph.strip() and paragraph not in seen_paragraphs:
                    seen_paragraphs.add(paragraph)
                    kept.append(paragraph)
            text = PARAGRAPH_SEPARATOR.join(kept)
            doc_id = f"{relative.as_posix()}:{name}"
            if len(text) >= MIN_DOC_CHARS and doc_id not in seen_ids:  # overloads in if/else branches share a name
                seen_ids.add(doc_id)
                documents.append({"id": doc_id, "text": text})
    return documents


def _code_without_docstrings(path: Path) -> str:
    source = path.read_text(encoding="utf-8")
    tree = _parse(path)
    if tree is None:
        return ""
    dropped = set()
    for node in [tree, *ast.walk(tree)]:
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                dropped.update(range(body[0].lineno, body[0].end_lineno + 1))
    return "\n".join(line for number, line in enumerate(source.splitlines(), 1) if number not in dropped)


def stdlib_code(root: Path) -> str:
    pieces, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            code = _code_without_docstrings(path)
        except UnicodeDecodeError:
            continue
        pieces.append(code)
        size += len(code)
        if size >= CODE_BYTES:
            break
    return "\n\n".join(pieces)[:CODE_BYTES]


def _write_gzip(path: Path, content: bytes) -> str:
    """Written to a temporary name and renamed: a reader never sees half a file. mtime 0: same bytes every run."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(content)
    tmp.replace(path)
    return hashlib.sha256(content).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "ebwm_scale" / "data" / "assets"))
    args = parser.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    documents = stdlib_documents(root)
    lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents).encode("utf-8")
    code = stdlib_code(root).encode("utf-8")
    manifest = {
        CORPUS_FILE: {"sha256": _write_gzip(out / CORPUS_FILE, lines), "documents": len(documents)},
        CODE_FILE: {"sha256": _write_gzip(out / CODE_FILE, code), "bytes": len(code)},
        "python": platform.python_version(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(documents):,} documents ({len(lines) / 1e6:.2f} MB), {len(code) / 1e6:.2f} MB of code -> {out}")


if __name__ == "__main__":
    main()
