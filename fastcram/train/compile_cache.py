"""Inductor's and Triton's compile caches in fastcram's cache folder, so a second run compiles faster.

Both libraries read their cache folder from an environment variable when they compile; `compile_caches()`
sets the two variables for the duration of a run (and puts back what was there), unless the user set them,
and returns what it did so the run log and the progress line can say so: no silent switch.
"""
from __future__ import annotations

import contextlib
import os
import sys

from ..data.builtin import writable_cache_dir

VARIABLES = {"inductor": "TORCHINDUCTOR_CACHE_DIR", "triton": "TRITON_CACHE_DIR"}


@contextlib.contextmanager
def compile_caches(root: str | None = None):
    """Yields {"inductor": {"path", "set_by"}, "triton": {...}}; set_by says who chose the folder. A cache placed
    in the cache folder is checked first: a file, read-only or full place is one line naming FASTCRAM_CACHE."""
    before = {var: os.environ.get(var) for var in VARIABLES.values()}
    ours = [name for name, var in VARIABLES.items() if not (before[var] and before[var] != _inductor_default(var))]
    if ours and root is None:
        root = writable_cache_dir()
    info = {}
    for name, var in VARIABLES.items():
        if name not in ours:
            info[name] = {"path": before[var], "set_by": f"the environment, {var}"}
        else:
            path = os.path.join(root, name)
            os.environ[var] = path
            info[name] = {"path": path, "set_by": f"fastcram, {var}"}
    _forget_cached_paths()
    try:
        yield info
    finally:
        for var, old in before.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
        _forget_cached_paths()


def _inductor_default(var: str) -> str | None:
    """Inductor writes its default folder into TORCHINDUCTOR_CACHE_DIR when it first compiles in a process:
    that value was not set by the user."""
    if var != VARIABLES["inductor"] or "torch._inductor" not in sys.modules:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def _forget_cached_paths() -> None:
    """Inductor memoises some paths under its cache folder; clear them when the folder changes (only
    needed when something compiled earlier in this process)."""
    if "torch._inductor.utils" in sys.modules:
        from torch._inductor.utils import clear_caches

        clear_caches()


def describe(info: dict) -> str:
    return "; ".join(f"{name} {v['path']} (set by {v['set_by']})" for name, v in info.items())
