"""The built-in corpus (public-domain prose shipped in corpus/), prepared once into the cache folder."""
from __future__ import annotations

import glob
import os

from ..config import DataConfig
from ..files import check_output_dir
from .prepare import MANIFEST, _say, prepare

CACHE_ENV = "FASTCRAM_CACHE"


def builtin_corpus_path() -> str:
    return os.path.join(os.path.dirname(__file__), "corpus", "pd_lit.txt.xz")


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastcram")


def writable_cache_dir() -> str:
    """The cache folder, checked before anything is written there: a file, a read-only or full place is one
    WriteError naming FASTCRAM_CACHE (or the default folder) and the fix."""
    folder = cache_dir()
    what = f"{CACHE_ENV}={folder}" if os.environ.get(CACHE_ENV) else f"the cache folder {folder} (set {CACHE_ENV})"
    check_output_dir(folder, what)
    return folder


def builtin_folder(vocab_size: int, version: int | None = None, root: str | None = None) -> str:
    """Where the built-in corpus prepared with a vocab_size tokenizer by data format `version` (default: this
    fastcram's) is cached, under root (default the cache folder). The format is part of the key: a copy an
    older fastcram prepared (another format, e.g. without a held-out split) is never reused, it is prepared
    again beside it."""
    from .prepare import FORMAT_VERSION

    version = FORMAT_VERSION if version is None else version
    return os.path.join(root or cache_dir(), f"pd_lit-v{vocab_size}-f{version}")


def builtin_data(vocab_size: int, cfg: DataConfig | None = None, progress: bool = True) -> str:
    """The built-in corpus prepared with a tokenizer of vocab_size; prepared once, then reused."""
    out = builtin_folder(vocab_size)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return out
    out = builtin_folder(vocab_size, root=writable_cache_dir())  # the cache folder checked before writing
    older = sorted(p for p in glob.glob(os.path.join(cache_dir(), f"pd_lit-v{vocab_size}*")) if p != out)
    _say(progress, f"preparing the built-in corpus once into {out}" + (
        f" (the older copy {older[0]} is another data format: not used, and may be deleted)" if older else ""))
    cfg = cfg or DataConfig()
    cfg = DataConfig(**{**cfg.__dict__, "vocab_size": vocab_size})
    prepare([builtin_corpus_path()], out, cfg, progress=progress)
    return out
