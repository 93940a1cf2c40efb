"""Files fastcram writes for the user: atomic replacement (temp file, fsync, rename) and content hashes.

A leaf module: it imports nothing else from fastcram, so every subsystem may use it.
"""
from __future__ import annotations

import hashlib
import json
import os


def atomic_write_bytes(path: str, data) -> None:
    """Write data to path so that path is either its old content or all of the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    """SHA-256 of what remains of an open binary file."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def inside(folder: str, name) -> str:
    """folder/name, for a file name read from one of fastcram's records (a manifest, a journal): the name must be
    a relative path that stays inside folder, also after links are followed. ValueError otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{name!r} is not a file name")
    if os.path.isabs(name) or any(part in ("", ".", "..") for part in name.replace("\\", "/").split("/")):
        raise ValueError(f"{name!r} is not a plain path relative to {folder}")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"{name!r} resolves outside {folder}")
    return path
