"""Files fastcram writes for the user: atomic replacement (temp file, fsync, rename), append-only JSONL logs,
content hashes, and the checks every command makes on its output paths before it starts working.

A failed write is one WriteError naming the file, the cause by its errno name (ENOSPC for a full disk) and the
fix; nothing half-written is left under the file's name. The CLI prints a WriteError as one line with exit
code 2, like a UserError; a running training reports it and goes on where it can.

A leaf module: it imports nothing else from fastcram, so every subsystem may use it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os

# errno -> what the user can do about it
_FIXES = {
    errno.ENOSPC: "free disk space there or choose another place",
    errno.EDQUOT: "free space within your disk quota or choose another place",
    errno.EROFS: "choose a place on a writable file system",
    errno.EACCES: "make it writable or choose another place",
    errno.EPERM: "make it writable or choose another place",
    errno.ENOENT: "create its folder first or choose another place",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another place",
    errno.EISDIR: "it is a folder: give a file name",
    errno.EEXIST: "choose another name or delete it",
}
# errnos that mean "this place cannot be written" rather than a bug
WRITE_ERRNOS = frozenset(_FIXES) | {errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}


def os_error_text(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the errno's name."""
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text


class WriteError(OSError):
    """A file or folder fastcram was to write cannot be written; str() is one line: what, why and the fix."""

    def __init__(self, path: str, cause: OSError | None = None, message: str | None = None):
        code = cause.errno if cause is not None else None
        super().__init__(code, message or "")
        self.path, self.filename, self.cause = path, path, cause
        fix = _FIXES.get(code, "check the path and the disk")
        self.message = message or f"cannot write {path}: {os_error_text(cause)}; {fix}"

    def __str__(self) -> str:
        return self.message


def as_write_error(path: str, e: OSError) -> WriteError:
    """A WriteError naming path, the file being written: not the temp file beside it that the OS named."""
    return e if isinstance(e, WriteError) else WriteError(path, e)


@contextlib.contextmanager
def writing(path: str):
    """Inside: an OSError that says the place cannot be written (a full disk, ...) becomes a WriteError naming
    path; for files written bit by bit (a benchmark's CSV, row by row)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(path, e) from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def write_all(f, data) -> None:
    """Write every byte of data to the binary file f (a raw file may take fewer bytes than offered)."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        if n is None:  # a buffered file takes everything or raises
            return
        view = view[n:]


def fsync_folder(folder: str) -> None:
    """Make renames and new names in folder durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- whole files, replaced atomically

def atomic_write_bytes(path: str, data) -> None:
    """Write data to path so that path is either its old content or all of the new one. A failure removes the
    temp file and raises WriteError naming path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise as_write_error(path, e) from None
    except BaseException:  # Ctrl-C mid-write: no temp file left behind
        _remove_quietly(tmp)
        raise


def finite(obj):
    """obj with every non-finite float (NaN, inf) replaced by None: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, indent: int | None = None) -> str:
    """Strict JSON (no NaN or Infinity, which other readers reject): non-finite floats become null."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (to_json(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------- append-only JSONL

class JsonlAppender:
    """An append-only JSONL file (run log, telemetry): every record is one whole line or not there at all.

    A record is written with one write to a file opened for appending; if the write fails (a full disk) the file
    is cut back to its size before the record and WriteError is raised: the file stays a sequence of whole
    records. A last line cut by a crash of an older writer is removed when the file is opened again."""

    def __init__(self, path: str, sync: bool = True):
        self.path, self.sync = path, sync
        self.repaired_bytes = repair_jsonl(path)
        try:
            self._f = open(path, "ab", buffering=0)
        except OSError as e:
            raise as_write_error(path, e) from None

    def append(self, record: dict) -> None:
        data = (to_json(record) + "\n").encode()
        fd = self._f.fileno()
        size = os.fstat(fd).st_size
        try:
            write_all(self._f, data)
            if self.sync:
                os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # a partial record would look like a damaged log
            raise as_write_error(self.path, e) from None

    def close(self) -> None:
        self._f.close()


def repair_jsonl(path: str) -> int:
    """Cut an incomplete last line (a record written by a process that died mid-write) off a JSONL file;
    returns the bytes removed. WriteError when the file cannot be changed."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep, pos = 0, size
            while pos > 0 and not keep:  # backwards, 64 KiB at a time, to the last newline
                start = max(0, pos - (1 << 16))
                f.seek(start)
                chunk = f.read(pos - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                pos = start
            f.truncate(keep)
            return size - keep
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise as_write_error(path, e) from None


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """The records of a JSONL file and the number of lines that are not a JSON object (a record cut by a full
    disk or a crash, say), which are skipped."""
    records, bad = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


# ---------------------------------------------------------------- output paths, checked before work starts

def _probe(folder: str, what: str) -> None:
    """Write one byte into folder (and remove it): proves the folder takes a new file and has room for it."""
    probe = os.path.join(folder, f".fastcram-write-test-{os.getpid()}")
    try:
        with open(probe, "wb", buffering=0) as f:
            write_all(f, b"\0")
    except OSError as e:
        _remove_quietly(probe)
        raise WriteError(folder, e, f"{what}: cannot write in {folder}: {os_error_text(e)}; "
                                    f"{_FIXES.get(e.errno, 'check the path and the disk')}") from None
    _remove_quietly(probe)


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_file(path: str, flag: str, may_exist: bool = True, make_parent: bool = False,
                      example: str = "out.json") -> str:
    """Before any work: path can be written as a file (a folder, a missing folder, an unwritable or full place
    is a WriteError naming `flag`). make_parent creates its folder; may_exist=False refuses an existing file.
    Returns path."""
    what = f"{flag} {path}"
    if os.path.isdir(path):
        raise WriteError(path, message=f"{what} is a folder; give a file name, e.g. {os.path.join(path, example)}")
    if os.path.lexists(path):
        if not may_exist:
            raise WriteError(path, message=f"{what} exists; fastcram does not overwrite it: choose another name or "
                                           f"delete it")
        if not os.path.isfile(path):
            raise WriteError(path, message=f"{what} exists and is not a regular file; choose another name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        ancestor = _existing_ancestor(parent)
        if not os.path.isdir(ancestor):
            raise WriteError(path, message=f"{what}: {ancestor} is a file, not a folder; choose another path")
        if not make_parent:
            raise WriteError(path, message=f"{what}: its folder {parent} does not exist; create it first or choose "
                                           f"another path")
        _probe(ancestor, what)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise WriteError(parent, e, f"{what}: cannot create its folder {parent}: {os_error_text(e)}; choose "
                                        f"another path") from None
    _probe(parent, what)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise WriteError(path, message=f"{what} is not writable; make it writable or choose another name")
    return path


def check_output_dir(path: str, flag: str) -> str:
    """Before any work: path is (or can be made as) a folder fastcram can write into. Checks the folder, or the
    nearest folder above it that exists; creates nothing. Returns path."""
    what = f"{flag} {path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WriteError(path, message=f"{what} is a file, not a folder; choose a folder")
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise WriteError(path, message=f"{what}: {ancestor} is a file, not a folder; choose another path")
    _probe(ancestor, what)
    return path


# ---------------------------------------------------------------- reading

def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    """SHA-256 of what remains of an open binary file."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def free_bytes(folder: str) -> int | None:
    """Bytes this process may still write in folder's filesystem (root may use the reserved blocks too), or
    None when it cannot be told."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return None
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


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
