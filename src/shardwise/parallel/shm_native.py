"""The shared-memory collectives' per-call work in C, built on first use with the system's C compiler.

In a decode step the hidden vector is a few kilobytes, so an all-reduce's cost is not the data but the
Python around it: a dozen torch and interpreter operations, each slow because the step's matrix-vector
products have just streamed hundreds of megabytes through the caches. Measured in a compiled SmolLM2 TP 2
step on this project's 2-core machine: 61 all-reduces a token, about 60 us each outside any wait (the copy
and the sum 8 us each, the rest interpreter), 9% of the step. ``shm_native.c`` does a call's copy, flag
store, spin and rank-order sum in two C calls through ``ctypes``.

It is compiled once per source version into the shardwise cache (``SHARDWISE_CACHE``, ``native/``), written
under a temporary name and renamed, so a concurrent or interrupted build never leaves a file a later run
loads. No compiler, a failed build, or ``SHARDWISE_NATIVE_COLLECTIVES=0``: ``load`` returns None and the
collectives stay in Python, with the same results. Why not a torch C++ extension: building one against
torch's headers takes about a minute here; this file has no dependency and builds in well under a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .. import settings

log = logging.getLogger("shardwise")

SOURCE = Path(__file__).with_name("shm_native.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built library with its functions typed, or None where it cannot be used (see the module doc)."""
    if not settings.native_collectives() or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the spin uses x86's pause instruction
    try:
        lib = ctypes.CDLL(str(_built()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("Native shared-memory collectives unavailable (%s); using Python", exc)
        return None
    lib.sw_arrive.argtypes = [_P, _P, _I, _P, _I, _P, _I, _I, _I, ctypes.POINTER(_I)]
    lib.sw_arrive.restype = _I
    for name in ("sw_sum_f32", "sw_sum_bf16"):
        getattr(lib, name).argtypes = [_P, _P, _I, _I]
        getattr(lib, name).restype = None
    return lib


def _built() -> Path:
    """The shared library for this source, compiled into the cache if it is not there yet."""
    source = SOURCE.read_bytes()
    target = settings.cache_dir() / "native" / f"shm_native-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)], check=True,
                       capture_output=True, timeout=120)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
