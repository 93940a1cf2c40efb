"""Small and read-only filesystems for the tests of full disks and unwritable outputs.

SmallDisk is a real tmpfs of a few MB where the machine allows a mount (root, or a container that permits it);
elsewhere it is a folder whose capacity is enforced by injecting ENOSPC at fastcram.files.write_all, the one
function every fastcram writer of run files (checkpoints, run log, telemetry, config, summary, reports) and
the output-path check write through: a write that does not fit writes what fits, then fails with ENOSPC, as
a full filesystem does. Used space is what the files under the folder hold, so deleting frees it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

from fastcram import files


def _mount(*args: str) -> bool:
    """Mount as asked; False where the machine does not allow it (or FASTCRAM_TEST_NO_MOUNT=1 asks the tests to
    take the injected path, to test it on a machine that could mount)."""
    if os.geteuid() != 0 or os.environ.get("FASTCRAM_TEST_NO_MOUNT") == "1":
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def _used(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(root) for f in names
               if os.path.isfile(os.path.join(d, f)))


class SmallDisk:
    def __init__(self, root: str, size: int, monkeypatch):
        self.root, self.size = root, size
        os.makedirs(root)
        self.kind = "tmpfs" if _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", root) else "injected"
        self.filler = os.path.join(root, "filler")
        if self.kind == "injected":
            self.capacity = size
            real = files.write_all

            def write_all(f, data):
                name = os.path.abspath(str(getattr(f, "name", "")))
                if not name.startswith(os.path.abspath(root) + os.sep):
                    return real(f, data)
                view = memoryview(data).cast("B")
                free = max(0, self.capacity - _used(root))
                if len(view) > free:
                    real(f, view[:free])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(f, view)

            monkeypatch.setattr(files, "write_all", write_all)

    def fill(self, leave: int = 0) -> None:
        """Use up the free space, all but `leave` bytes."""
        if self.kind == "injected":
            self.capacity = _used(self.root) + leave
            return
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 20, 1 << 16, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)
        if leave:
            os.truncate(self.filler, max(0, os.path.getsize(self.filler) - leave))

    def free(self) -> None:
        """Give the space back."""
        if self.kind == "injected":
            self.capacity = self.size
        elif os.path.exists(self.filler):
            os.remove(self.filler)

    def grow(self, size: int) -> None:
        """A bigger disk (a tmpfs is remounted with the new size)."""
        self.size = size
        if self.kind == "injected":
            self.capacity = size
        else:
            assert _mount("-o", f"remount,size={size}", self.root)

    def close(self) -> None:
        if self.kind == "tmpfs":
            _umount(self.root)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """small_disk(size) -> SmallDisk mounted (or simulated) under tmp_path."""
    disks = []

    def make(size: int = 5 << 20) -> SmallDisk:
        disk = SmallDisk(str(tmp_path / f"disk{len(disks)}"), size, monkeypatch)
        disks.append(disk)
        return disk

    yield make
    for d in disks:
        d.close()


@pytest.fixture
def readonly_dir(tmp_path):
    """An existing folder nothing can be written into: a read-only tmpfs as root, a chmod 500 folder otherwise;
    None where neither works (root on a machine that allows no mount)."""
    path = tmp_path / "readonly"
    path.mkdir()
    if _mount("-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(path)):
        yield str(path)
        _umount(str(path))
    elif os.geteuid() != 0:
        path.chmod(0o500)
        yield str(path)
        path.chmod(0o700)
    else:
        yield None
