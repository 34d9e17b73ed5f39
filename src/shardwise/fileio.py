"""Byte-level file I/O shared by the loader and the pre-shard writer: exact reads and writes at an
offset, file-to-file copies inside the kernel, and per-thread scratch buffers.

These are plain POSIX loops (``pread`` and ``pwrite`` may move fewer bytes than asked); no library
offers them with the truncation reporting a checkpoint reader needs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import torch

from .errors import ShardwiseError


def bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's storage (any dtype, bfloat16 included)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


_SCRATCH = threading.local()


def scratch(nbytes: int, slot: str = "read") -> torch.Tensor:
    """This thread's reusable buffer for ``slot`` (allocated once, so its pages are faulted in once)."""
    buf = getattr(_SCRATCH, slot, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_SCRATCH, slot, buf)
    return buf


def copy_file_bytes(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """File to file with ``copy_file_range``: no trip through user memory (and no copy at all where the
    file system shares blocks); plain reads and writes where the kernel or file system can't."""
    if hasattr(os, "copy_file_range"):
        try:
            while count:
                n = os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)
                if n <= 0:
                    raise ShardwiseError(f"unexpected end of file at byte {src_offset}: "
                                         "the checkpoint file is truncated")
                src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    buf = scratch(min(count, 32 << 20), "copy")
    while count:
        n = min(count, buf.numel())
        view = bytes_of(buf[:n])
        pread_exact(fd=src_fd, buf=view, offset=src_offset)
        pwrite_all(dst_fd, view, dst_offset)
        src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise ShardwiseError(f"unexpected end of file at byte {offset}: the checkpoint file is truncated")
        buf, offset = buf[n:], offset + n


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 16 MiB chunks (manifests, assembled downloads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
