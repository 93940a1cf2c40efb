"""GLUE task data: the 8 tasks fastcram scores, read from a local folder in the layout of the original GLUE
distribution or from Hugging Face `datasets` (`nyu-mll/glue`, an optional extra imported only when used).

Local files are tab-separated with no quoting (as the GLUE distribution writes them), one example per line.
Label ids match the Hugging Face dataset (e.g. MNLI: entailment 0, neutral 1, contradiction 2), so both
sources give the same classes. A missing folder or file, a wrong header and a malformed row are errors that
name the file and line; nothing is skipped silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

HF_DATASET = "nyu-mll/glue"
LAST = -1  # column index meaning "the last column of the header"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # CLI name, e.g. "sst2"
    folder: str  # folder of the original distribution, e.g. "SST-2"
    classes: tuple[str, ...] | None  # raw label strings in id order; None: regression (STS-B)
    cols: tuple[int, int | None, int]  # local columns of sentence A, sentence B (None: single), label
    header: tuple[str, ...] | None  # expected header names at those columns; None: the file has no header
    dev_files: dict[str, str]  # dev split name -> file name
    hf_name: str  # config of nyu-mll/glue
    hf_text: tuple[str, str | None]  # HF columns of sentence A and B
    hf_dev: dict[str, str]  # dev split name -> HF split

    @property
    def num_outputs(self) -> int:
        return 1 if self.classes is None else len(self.classes)

    @property
    def is_pair(self) -> bool:
        return self.cols[1] is not None


_DEV = {"dev": "dev.tsv"}
_HF_DEV = {"dev": "validation"}
_BIN = ("0", "1")
_ENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cola", "CoLA", _BIN, (3, None, 1), None, _DEV, "cola", ("sentence", None), _HF_DEV),
    TaskSpec("sst2", "SST-2", _BIN, (0, None, 1), ("sentence", "label"), _DEV, "sst2", ("sentence", None), _HF_DEV),
    TaskSpec("mrpc", "MRPC", _BIN, (3, 4, 0), ("#1 String", "#2 String", "Quality"), _DEV, "mrpc",
             ("sentence1", "sentence2"), _HF_DEV),
    TaskSpec("stsb", "STS-B", None, (7, 8, LAST), ("sentence1", "sentence2", "score"), _DEV, "stsb",
             ("sentence1", "sentence2"), _HF_DEV),
    TaskSpec("qqp", "QQP", _BIN, (3, 4, 5), ("question1", "question2", "is_duplicate"), _DEV, "qqp",
             ("question1", "question2"), _HF_DEV),
    TaskSpec("mnli", "MNLI", ("entailment", "neutral", "contradiction"), (8, 9, LAST),
             ("sentence1", "sentence2", "gold_label"),
             {"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"}, "mnli",
             ("premise", "hypothesis"), {"matched": "validation_matched", "mismatched": "validation_mismatched"}),
    TaskSpec("qnli", "QNLI", _ENT, (1, 2, 3), ("question", "sentence", "label"), _DEV, "qnli",
             ("question", "sentence"), _HF_DEV),
    TaskSpec("rte", "RTE", _ENT, (1, 2, 3), ("sentence1", "sentence2", "label"), _DEV, "rte",
             ("sentence1", "sentence2"), _HF_DEV),
]}


@dataclass
class Split:
    """One split of one task: texts and labels (int64 class ids, or float32 scores for regression)."""
    a: list[str]
    b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split([self.a[i] for i in idx], None if self.b is None else [self.b[i] for i in idx],
                     self.labels[idx])


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split
    dev: dict[str, Split] = field(default_factory=dict)  # split name -> data (MNLI: matched, mismatched)


def parse_tasks(text: str) -> list[str]:
    """`cola,sst2,...` -> canonical task names; accepts the folder spellings too (SST-2, STS-B)."""
    aliases = {**{t: t for t in TASKS}, **{s.folder.lower().replace("-", ""): t for t, s in TASKS.items()}}
    names = []
    for raw in text.split(","):
        key = raw.strip().lower().replace("-", "").replace("_", "")
        if not key:
            continue
        if key not in aliases:
            raise UserError(f"--tasks: unknown GLUE task {raw.strip()!r}; choose from {','.join(TASKS)}")
        if aliases[key] not in names:
            names.append(aliases[key])
    if not names:
        raise UserError(f"--tasks is empty; pass e.g. --tasks {','.join(TASKS)}")
    return names


# ---------------------------------------------------------------- local GLUE folders

def _read_rows(path: str):
    """(line number, columns) of each non-empty line; only '\\n' ends a line, so a stray '\\r' stays text."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; the task folder must hold the GLUE files "
                        f"(train.tsv and the dev tsv files)")
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as f:  # -sig: MRPC starts with a byte-order mark
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n").removesuffix("\r")
                if line.strip():
                    yield n, line.split("\t")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _label(spec: TaskSpec, raw: str, path: str, n: int):
    raw = raw.strip()
    if spec.classes is None:
        try:
            v = float(raw)
        except ValueError:
            v = float("nan")
        if not 0.0 <= v <= 5.0:  # also rejects nan
            raise UserError(f"{path}:{n}: score {raw!r} is not a number between 0 and 5")
        return v
    if raw not in spec.classes:
        raise UserError(f"{path}:{n}: label {raw!r} is not one of {', '.join(spec.classes)}")
    return spec.classes.index(raw)


def read_tsv(spec: TaskSpec, path: str) -> Split:
    """One GLUE tsv file of task `spec`: header checked, every row checked."""
    rows = _read_rows(path)
    ca, cb, cl = spec.cols
    if spec.header is not None:
        first = next(rows, None)
        if first is None:
            raise UserError(f"{path} is empty; expected a header and examples")
        n, head = first
        cl = len(head) - 1 if cl == LAST else cl
        got = tuple(head[c].strip() if c < len(head) else "" for c in (ca, cb, cl) if c is not None)
        if tuple(h.lower() for h in got) != tuple(h.lower() for h in spec.header):
            raise UserError(f"{path}:{n}: header has {got} where {spec.folder} needs {spec.header} "
                            f"(columns {', '.join(str(c) for c in (ca, cb, cl) if c is not None)}); "
                            f"is this the {spec.folder} file of the GLUE distribution?")
    need = max(c for c in (ca, cb, cl) if c is not None) + 1
    a, b, labels = [], [] if cb is not None else None, []
    for n, row in rows:
        if len(row) < need:
            raise UserError(f"{path}:{n}: malformed row: {len(row)} tab-separated columns, {spec.folder} "
                            f"needs at least {need}")
        a.append(row[ca])
        if b is not None:
            b.append(row[cb])
        labels.append(_label(spec, row[cl], path, n))
    if not a:
        raise UserError(f"{path} holds no examples")
    dtype = np.float32 if spec.classes is None else np.int64
    return Split(a, b, np.asarray(labels, dtype=dtype))


def load_local(data_dir: str, name: str) -> TaskData:
    spec = TASKS[name]
    folder = os.path.join(data_dir, spec.folder)
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist: --data-dir must hold the GLUE task folders "
                        f"({', '.join(t.folder for t in TASKS.values())}); add {spec.folder}/ or leave "
                        f"{name} out of --tasks")
    train = read_tsv(spec, os.path.join(folder, "train.tsv"))
    dev = {split: read_tsv(spec, os.path.join(folder, f)) for split, f in spec.dev_files.items()}
    return TaskData(spec, train, dev)


# ---------------------------------------------------------------- Hugging Face datasets

def _from_hf(spec: TaskSpec, ds) -> Split:
    ka, kb = spec.hf_text
    dtype = np.float32 if spec.classes is None else np.int64
    labels = np.asarray(list(ds["label"]), dtype=dtype)  # list(): newer datasets return a lazy Column
    if spec.classes is not None and ((labels < 0) | (labels >= len(spec.classes))).any():
        raise UserError(f"{HF_DATASET} {spec.hf_name}: labels outside 0..{len(spec.classes) - 1} "
                        f"(an unlabelled test split?)")
    return Split(list(ds[ka]), None if kb is None else list(ds[kb]), labels)


def load_hf(name: str) -> TaskData:
    spec = TASKS[name]
    try:
        import datasets  # optional extra: only this code path needs it
    except ImportError:
        raise UserError(f"GLUE without --data-dir reads {HF_DATASET} with the optional `datasets` package, "
                        f"which is not installed; pip install datasets, or pass --data-dir with the GLUE "
                        f"task folders") from None
    try:
        ds = datasets.load_dataset(HF_DATASET, spec.hf_name)
    except Exception as e:  # network, cache and hub errors come in many types; all end the same way
        raise UserError(f"cannot load {HF_DATASET} {spec.hf_name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pass --data-dir with the GLUE task "
                        f"folders instead") from None
    return TaskData(spec, _from_hf(spec, ds["train"]), {s: _from_hf(spec, ds[h]) for s, h in spec.hf_dev.items()})


def load_task(name: str, data_dir: str | None, max_examples: int | None = None) -> TaskData:
    """Task `name` from `data_dir` (GLUE layout) or Hugging Face; each split capped at max_examples by a
    fixed random subset (the same for every fine-tuning seed)."""
    data = load_local(data_dir, name) if data_dir else load_hf(name)
    if max_examples is not None:
        data.train = _cap(data.train, max_examples)
        data.dev = {s: _cap(d, max_examples) for s, d in data.dev.items()}
    return data


def _cap(split: Split, n: int) -> Split:
    if len(split) <= n:
        return split
    idx = np.sort(np.random.default_rng(0).choice(len(split), size=n, replace=False))
    return split.subset(idx)
