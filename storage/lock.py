"""One build at a time per dataset root.

On a local root the lock is ``fcntl.flock`` on ``<root>/build.lock``: the kernel releases it when
the holder dies, even by SIGKILL, so there are no stale locks. On object stores (no flock) the
lock is a JSON file with the holder and a heartbeat; one older than ``stale_after`` seconds is
taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from storage.root import DatasetRoot


class RootLocked(RuntimeError):
    """Another build holds the dataset root."""


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


@contextmanager
def build_lock(root: DatasetRoot, wait: float = 0.0, stale_after: float = 3600.0) -> Iterator[None]:
    """Hold the root's build lock; wait up to ``wait`` seconds, then raise :class:`RootLocked`."""
    path = root.join("build.lock")
    if root.is_local:
        with _flock(path, wait):
            yield
    else:
        with _file_lock(root, path, wait, stale_after):
            yield


def _describe(info: str) -> str:
    try:
        data = json.loads(info)
        return f"pid {data['pid']} on {data['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def _flock(path: str, wait: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held_by = _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
                    raise RootLocked(
                        f"another build is running on {os.path.dirname(path)} ({held_by}); "
                        "wait for it to finish or pass --wait SECONDS"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def _file_lock(root: DatasetRoot, path: str, wait: float, stale_after: float) -> Iterator[None]:
    me = _holder()
    deadline = time.monotonic() + wait
    while True:
        current = root.read_json(path)
        if current is None or time.time() - float(current.get("since", 0)) > stale_after:
            root.write_json(path, me)
            if root.read_json(path) == json.loads(json.dumps(me)):
                break
        if time.monotonic() >= deadline:
            raise RootLocked(
                f"another build is running on {root.url} ({_describe(json.dumps(current))}); "
                "wait for it to finish or pass --wait SECONDS"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        root.remove(path)
