"""Environment settings and machine facts, read in one place, with one parsing rule, when used.

Nothing is read at import time: a test or a launcher that sets a variable after importing shardwise
still gets its way. A value that does not parse is a one-line ``ShardwiseError`` naming the variable,
never a silent default.

| variable | meaning | default |
|---|---|---|
| SHARDWISE_DEBUG | tracebacks instead of one-line errors (also ``--debug``) | off |
| SHARDWISE_TIMEOUT | seconds a collective may wait for a peer | 600 |
| SHARDWISE_SHM_TIMEOUT | the same, for the shared-memory collectives | SHARDWISE_TIMEOUT |
| SHARDWISE_NATIVE_COLLECTIVES | the shared-memory collectives' per-call work in C (parallel/shm_native.py) | on |
| SHARDWISE_SHM_SLOT_BYTES | bytes per rank in a shared-memory exchange | 1 MiB |
| SHARDWISE_FAST_COLLECTIVES | shared-memory collectives between local ranks (x86-64) | on |
| SHARDWISE_MAP_WEIGHTS | map whole-row slices of the checkpoint instead of copying them | on |
| SHARDWISE_HUGEPAGES | transparent huge pages for the copy arena | off |
| SHARDWISE_CACHE | where converted checkpoints are kept | ~/.cache/shardwise |
| SHARDWISE_CHECK_DEVICES | device checks: enforce the GPU rules on every collective (docs/gpu.md) | off |
| SHARDWISE_MATVEC_REDUCTION | compiled CPU decode computes one-row linears as fused reductions (matvec.py) | on |
| SHARDWISE_ATTENTION_REDUCTION | compiled CPU decode: one-query attention as arithmetic (decode_attention.py) | on |
| SHARDWISE_API_KEY | the key `shardwise serve` requires when `--api-key` is not given | none |
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import ShardwiseError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ShardwiseError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")
    return value in _TRUE


def number(name: str, default: float, minimum: float = 0.0) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        parsed = float(value)
    except ValueError:
        parsed = float("nan")
    if not parsed >= minimum or parsed == float("inf"):
        raise ShardwiseError(f"{name}={value!r}: expected a number of at least {minimum:g}")
    return parsed


def debug() -> bool:
    return flag("SHARDWISE_DEBUG", False)


def collective_timeout() -> float:
    return number("SHARDWISE_TIMEOUT", 600.0, minimum=1.0)


def shm_timeout() -> float:
    return number("SHARDWISE_SHM_TIMEOUT", collective_timeout(), minimum=0.001)


def shm_slot_bytes(default: int) -> int:
    return int(number("SHARDWISE_SHM_SLOT_BYTES", default, minimum=64))


def fast_collectives() -> bool:
    return flag("SHARDWISE_FAST_COLLECTIVES", True)


def map_weights() -> bool:
    return flag("SHARDWISE_MAP_WEIGHTS", True)


def hugepages() -> bool:
    return flag("SHARDWISE_HUGEPAGES", False)


def check_devices() -> bool:
    return flag("SHARDWISE_CHECK_DEVICES", False)


def matvec_reduction() -> bool:
    return flag("SHARDWISE_MATVEC_REDUCTION", True)


def native_collectives() -> bool:
    return flag("SHARDWISE_NATIVE_COLLECTIVES", True)


def attention_reduction() -> bool:
    return flag("SHARDWISE_ATTENTION_REDUCTION", True)


def api_key() -> str | None:
    """The API key for ``shardwise serve`` from the environment (it stays out of ``ps`` listings)."""
    return os.environ.get("SHARDWISE_API_KEY") or None


def cache_dir() -> Path:
    value = os.environ.get("SHARDWISE_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "shardwise"


def check_all() -> None:
    """Read every setting once, so a bad value is refused before any rank starts."""
    debug(), shm_timeout(), shm_slot_bytes(1), fast_collectives(), map_weights(), hugepages(), check_devices()
    matvec_reduction(), attention_reduction(), native_collectives()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine is still running (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed sibling stays a zombie until its parent reaps it; it is dead all the same
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True
