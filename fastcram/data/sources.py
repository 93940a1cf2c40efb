"""Where documents come from: local text, JSONL and Parquet files (plain or compressed), folders of them, and
Hugging Face datasets streamed by id; several inputs mixed by weight into one stream of documents.

An input is a file, a folder (searched recursively, files in sorted order) or `hf:NAME[:CONFIG][:SPLIT]`
(split defaults to train; NAME may also be a local folder that `datasets` can read). The stream is a pure
function of the inputs: reading it again gives the same documents in the same order, which is what lets an
interrupted prepare skip what it already wrote. Parquet, .zst and hf: need the optional packages of the
`corpora` extra (pyarrow, zstandard, datasets), imported only when such an input is used.
"""
from __future__ import annotations

import gzip
import importlib
import io
import json
import lzma
import os
from typing import Callable, Iterable, Iterator

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst",
                 ".parquet")
HF_PREFIX = "hf:"
INSTALL_HINT = "install it with: pip install 'fastcram[corpora]'"
PROGRESS_EVERY = 256  # documents between two progress updates of a reader (a tell() per document is waste)


class ReadError(UserError):
    """A read failed for a reason outside the data itself (I/O, network): the output so far stays resumable."""


def is_hf(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def find_text_files(paths: Iterable[str]) -> list[str]:
    """Expand files and folders (recursively, sorted) into the files fastcram reads; hf: ids pass through."""
    files = []
    for p in paths:
        if is_hf(p):
            parse_hf_spec(p)
            files.append(p)
            continue
        if not os.path.exists(p):
            raise UserError(f"input path {p} does not exist; pass an existing file or folder with --input")
        if os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names
                           if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise UserError(f"folder {p} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
            files += found
        elif p.endswith(TEXT_SUFFIXES):
            files.append(p)
        else:
            raise UserError(f"{p} is not a supported text file; use one of {', '.join(TEXT_SUFFIXES)} "
                            f"or hf:NAME[:CONFIG][:SPLIT]")
    return files


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config or None, split)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"{spec!r} is not a dataset id; write hf:NAME[:CONFIG][:SPLIT], "
                        f"e.g. hf:wikimedia/wikipedia:20231101.en")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def optional_import(module: str, needed_for: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{needed_for} needs the Python package {module.split('.')[0]}; {INSTALL_HINT}") from None


# ---------------------------------------------------------------- one file

def _open_text(path: str):
    """(raw binary file, UTF-8 text stream over its decompressed content); raw.tell() measures progress."""
    raw = open(path, "rb")
    try:
        if path.endswith(".xz"):
            stream = lzma.LZMAFile(raw)
        elif path.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif path.endswith(".zst"):
            zstd = optional_import("zstandard", f"reading {path}")
            # The Pile's files use long windows; the default limit would refuse them.
            stream = zstd.ZstdDecompressor(max_window_size=2 ** 31).stream_reader(raw, read_size=1 << 20)
        else:
            stream = raw
        return raw, io.TextIOWrapper(stream, encoding="utf-8", errors="strict")
    except BaseException:
        raw.close()
        raise


def _plain_documents(lines: Iterable[str], doc_chars: int) -> Iterator[str]:
    """Blank-line paragraphs grouped into documents of about doc_chars characters."""
    doc: list[str] = []
    size = 0
    for line in lines:
        line = line.strip()
        at_paragraph_end = not line
        if line:
            doc.append(line)
            size += len(line) + 1
        # Flush at a paragraph boundary once big enough; texts without blank lines flush at 2x.
        if size >= doc_chars and (at_paragraph_end or size >= 2 * doc_chars):
            yield " ".join(doc)
            doc, size = [], 0
    if doc:
        yield " ".join(doc)


def _has_text(text: str) -> bool:
    return bool(text) and not text.isspace()


def _jsonl_documents(lines: Iterable[str], path: str, field: str = "text") -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a JSON object with a \"{field}\" field; fix or remove that line "
                            f"(or name the field with --text-field)") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: field \"{field}\" is not a string")
        if _has_text(text):
            yield text


def _parquet_documents(path: str, field: str, report: Callable[[float], None]) -> Iterator[str]:
    pq = optional_import("pyarrow.parquet", f"reading {path}")
    pa = optional_import("pyarrow", f"reading {path}")
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column {field!r} (it has {', '.join(names)}); name it with --text-field")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {field!r} holds {kind}, not text")
    rows, done, size = max(pf.metadata.num_rows, 1), 0, os.path.getsize(path)
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and _has_text(text):
                yield text
        done += batch.num_rows
        report(size * done / rows)


def file_documents(path: str, doc_chars: int, field: str = "text",
                   report: Callable[[float], None] = lambda done: None) -> Iterator[str]:
    """The documents of one local file; report(bytes of the file consumed) is called now and then."""
    try:
        if path.endswith(".parquet"):
            yield from _parquet_documents(path, field, report)
            return
        raw, f = _open_text(path)
        with raw, f:
            if ".jsonl" in os.path.basename(path):
                docs = _jsonl_documents(f, path, field)
            else:
                docs = _plain_documents(f, doc_chars)
            for n, doc in enumerate(docs):
                if n % PROGRESS_EVERY == 0:
                    report(raw.tell())
                yield doc
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                        f"or leave it out") from None
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path}: it is truncated or corrupt ({e})") from None
    except ValueError as e:  # pyarrow's ArrowInvalid and zstandard's ZstdError are ValueErrors
        raise UserError(f"cannot read {path}: {e}") from None
    except OSError as e:
        raise ReadError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------- a Hugging Face dataset

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def hf_documents(spec: str, field: str = "text",
                 report: Callable[[float], None] = lambda done: None) -> tuple[Iterator[str], int | None]:
    """(documents of a streamed dataset, its row count when the dataset card states it)."""
    name, config, split = parse_hf_spec(spec)
    datasets = optional_import("datasets", f"reading {spec}")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        raise ReadError(f"cannot open {spec}: {_first_line(e)}") from None
    cols = ds.column_names
    if cols is not None:
        if field not in cols:
            raise UserError(f"{spec} has no column {field!r} (it has {', '.join(cols)}); name it with --text-field")
        ds = ds.select_columns([field])
    rows = None
    try:
        rows = ds.info.splits[split].num_examples or None
    except (AttributeError, KeyError, TypeError):
        pass
    return _hf_rows(ds, spec, field, report), rows


def _hf_rows(ds, spec: str, field: str, report: Callable[[float], None]) -> Iterator[str]:
    done = 0
    batches = ds.iter(batch_size=1000)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            raise ReadError(f"reading {spec} failed after {done} rows: {_first_line(e)}") from None
        if batch is None:
            return
        if field not in batch:
            raise UserError(f"{spec} has no column {field!r} (it has {', '.join(batch)}); name it with --text-field")
        for text in batch[field]:
            if isinstance(text, str) and _has_text(text):
                yield text
        done += len(batch[field])
        report(done)


# ---------------------------------------------------------------- inputs and their mix

class Input:
    """One --input: its files or dataset read as one document stream; knows how far reading has got."""

    def __init__(self, spec: str, doc_chars: int, field: str = "text"):
        self.spec, self.doc_chars, self.field = spec, doc_chars, field
        self.files = [] if is_hf(spec) else find_text_files([spec])
        if is_hf(spec):
            parse_hf_spec(spec)
        self.sizes = [os.path.getsize(f) for f in self.files]
        self.total: float | None = float(sum(self.sizes)) if self.files else None  # bytes, or rows for hf:
        self.done = 0.0  # same unit as total

    def fingerprint(self) -> list:
        """What identifies the content: the spec for a dataset, (absolute path, size) per local file."""
        if is_hf(self.spec):
            return [self.spec]
        return [[os.path.abspath(f), s] for f, s in zip(self.files, self.sizes)]

    def fraction(self) -> float | None:
        return None if not self.total else min(self.done / self.total, 1.0)

    def documents(self) -> Iterator[str]:
        self.done = 0.0
        if is_hf(self.spec):
            docs, rows = hf_documents(self.spec, self.field, self._set_done(0.0))
            self.total = float(rows) if rows else None
            yield from docs
            return
        before = 0.0
        for path, size in zip(self.files, self.sizes):
            yield from file_documents(path, self.doc_chars, self.field, self._set_done(before))
            before += size
            self.done = before

    def _set_done(self, base: float) -> Callable[[float], None]:
        def report(done: float) -> None:
            self.done = base + done
        return report


def mix_documents(inputs: list[Input], weights: list[float] | None = None) -> Iterator[tuple[int, str]]:
    """(input index, document) from all inputs, interleaved by characters.

    Without weights every input is read to its end, each taking an equal share of characters while it
    lasts (so any prefix, e.g. a tokenizer sample, holds all inputs). With weights, input i gets the share
    weights[i] / sum(weights) of the characters, and the mix ends when the first input runs out, so the
    shares hold for the whole output. The choice is deterministic: the input furthest behind its share
    goes next, ties to the earlier input.
    """
    streams = [inp.documents() for inp in inputs]
    if len(streams) == 1:
        for doc in streams[0]:
            yield 0, doc
        return
    shares = weights or [1.0] * len(streams)
    taken = [0] * len(streams)
    active = list(range(len(streams)))
    while active:
        i = min(active, key=lambda j: (taken[j] / shares[j], j))
        doc = next(streams[i], None)
        if doc is None:
            if weights:
                return
            active.remove(i)
            continue
        taken[i] += len(doc)
        yield i, doc


def mix_fraction(inputs: list[Input], weighted: bool) -> float | None:
    """How far the mix has got, when the sizes are known: a weighted mix ends with its first exhausted input."""
    fracs = [inp.fraction() for inp in inputs]
    if weighted:
        known = [f for f in fracs if f is not None]
        return max(known) if known else None
    if len(inputs) == 1:
        return fracs[0]
    if all(not is_hf(inp.spec) for inp in inputs):
        total = sum(inp.total or 0.0 for inp in inputs)
        return sum(inp.done for inp in inputs) / total if total else None
    return None


def iter_documents(files: list[str], doc_chars: int, field: str = "text") -> Iterator[str]:
    """All documents of the given files (or hf: ids), one after the other, streamed."""
    for path in files:
        if is_hf(path):
            yield from hf_documents(path, field)[0]
        else:
            yield from file_documents(path, doc_chars, field)
