"""Which device each rank runs on, binding it before the process group exists, and the device checks.

**Mapping.** A rank's device comes from, in order: the partition config (``cuda:<deviceId>`` of its
entry), else, with ``--device cuda``, ``cuda:<local rank>``: torchrun's ``LOCAL_RANK``, or the index
of the rank among the ranks this launch starts (``rank - start_rank``). One GPU per local rank is
what NCCL needs; with every rank on ``cuda:0`` (what a bare ``"cuda"`` string gives) a TP > 1 run
cannot work. ``--device cuda:N`` names one GPU, so it is for one local rank only.

**Binding.** ``bind_device`` runs in each rank *before* ``init_process_group``
(``torch.cuda.set_device``): NCCL and the object collectives use the current device, and a group
created first would put every rank's communicator context on ``cuda:0``. It also claims the device
on this host (a ``flock``-ed file named after the run and the device), so two local ranks of one
run that compute the same device fail at once with a one-line error instead of deadlocking in NCCL.

**Backend.** A CUDA run's group is ``"cpu:gloo,cuda:nccl"``: device tensors go through NCCL, and the
few host-side values (the slowest rank's load time, the engine's step headers, error strings)
through gloo. Those are a handful of small messages per run or per engine step; copying each to the
GPU and back to fit an NCCL-only group would cost more than gloo does and add a device sync each.
Host tensors may reach a collective only through the named host helpers
(``Collectives.host_all_gather`` / ``host_broadcast``), and only on a group with a CPU backend.

**Device checks** (``SHARDWISE_CHECK_DEVICES=1``). CI has no GPU, so this mode runs the CPU path
while enforcing the GPU rules. With ``--device cuda`` on a machine without CUDA the GPUs are
*simulated*: each rank declares the device it would have (``cuda:1``...), the group is gloo but is
treated as the CUDA run's ``"cpu:gloo,cuda:nccl"``, and a tensor counts as "on the device" when it
was put there (``put``, ``state_to_device``) or computed from one that was: it is then a
``SimulatedDeviceTensor``, a plain CPU tensor subclass that marks its results the same way. Every
collective checks its tensors and raises ``DeviceCheckError`` (one line) when a host tensor reaches a
device collective, a host helper is used on a group without a CPU backend, a collective runs before
the rank's device was bound (or the device was bound after the group existed), or two local ranks
claim one device. With real GPUs the same checks compare real tensor devices. At the end of a run
rank 0 logs ``device checks: N collectives checked, 0 violations``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import settings
from ..errors import ShardwiseError

log = logging.getLogger("shardwise")
CUDA_BACKEND = "cpu:gloo,cuda:nccl"  # device tensors over NCCL, host scalars over gloo (see above)
STAGING_BYTES = 64 << 20  # per pinned staging buffer (two of them) when weights are copied to a GPU


class DeviceCheckError(ShardwiseError):
    """A GPU rule was broken: a tensor on the wrong device at a collective, a device claimed twice,
    or a device bound too late."""


class SimulatedDeviceTensor(torch.Tensor):
    """A CPU tensor standing for one on this rank's simulated GPU (device-check mode only).

    Results of operations on it are marked the same way (torch's default ``__torch_function__``), so
    activations computed from device inputs or weights are device tensors; ``.cpu()`` gives a plain
    (host) tensor, as it would on a real GPU.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu or func is torch.Tensor.numpy:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return super().__torch_function__(func, types, args, kwargs)


@dataclass
class _State:
    device: str | None = None  # this rank's device, once bound ("cpu", "cuda:1")
    simulated: bool = False  # a GPU that this CPU-only run stands in for (device checks)
    backend: str | None = None  # the group's backend as the run declares it (what a GPU run would get)
    rank: int = 0
    claim: int | None = None  # file descriptor of the flock-ed claim file
    claim_path: str | None = None
    checked: int = 0
    violations: int = 0


_STATE = _State()


# -- the mapping -------------------------------------------------------------------------------------


def checking() -> bool:
    """Whether device checks are on (``SHARDWISE_CHECK_DEVICES``)."""
    return settings.check_devices()


def simulating(device: str) -> bool:
    """Whether ``device`` (a ``--device`` value) runs as simulated GPUs: device checks on, no CUDA here."""
    return device.startswith("cuda") and checking() and not torch.cuda.is_available()


def local_rank(rank: int, start_rank: int = 0) -> int:
    """This rank's index among the ranks of its host: torchrun's ``LOCAL_RANK``, else ``rank - start_rank``."""
    value = os.environ.get("LOCAL_RANK")
    if value is not None and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return int(value)
        except ValueError:
            raise ShardwiseError(f"LOCAL_RANK={value!r} is not an integer") from None
    return rank - start_rank


def rank_device(device: str, rank: int, start_rank: int = 0, devices: Sequence[str] | None = None,
                local_ranks: int = 1) -> str:
    """The device of global rank ``rank``: its partition-config device if ``devices`` (one per global
    rank) is given, else ``cuda:<local rank>`` for ``--device cuda``, else ``device`` itself."""
    if devices:
        if not 0 <= rank < len(devices):
            raise ShardwiseError(f"rank {rank} has no device in the partition config ({len(devices)} devices)")
        return devices[rank]
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return f"cuda:{local_rank(rank, start_rank)}"
    if device.startswith("cuda:") and device[5:].isdigit():
        if local_ranks > 1:
            raise ShardwiseError(f"--device {device} names one GPU but {local_ranks} ranks run on this host; use "
                                 "--device cuda (one GPU per local rank) or a partition config")
        return device
    raise ShardwiseError(f"--device {device!r} is not cpu, cuda or cuda:<index>")


def backend_for(device: str) -> str:
    """The process-group backend a run on ``device`` declares."""
    return CUDA_BACKEND if device.startswith("cuda") else "gloo"


# -- binding -----------------------------------------------------------------------------------------


def bind_device(device: str, rank: int = 0, run_key: str | None = None, simulated: bool | None = None) -> str:
    """Make ``device`` this process's device; call it before ``init_process_group``.

    CUDA: ``torch.cuda.set_device``. CUDA or simulated: claim the device on this host for the run
    named ``run_key`` (two local ranks of one run claiming one device is a ``DeviceCheckError``).
    Returns the device.
    """
    simulated = simulating(device) if simulated is None else simulated
    if checking() and dist.is_available() and dist.is_initialized():
        _violation(f"rank {rank} bound {device} after its process group was created; bind_device must come first")
    release_device()
    if device.startswith("cuda") and not simulated:
        torch.cuda.set_device(device)
    _STATE.device, _STATE.simulated, _STATE.rank = device, simulated, rank
    _STATE.backend, _STATE.checked, _STATE.violations = None, 0, 0
    if device.startswith("cuda") and run_key is not None:
        _claim(device, rank, run_key)
    return device


def bound_device() -> str | None:
    """This process's device, if ``bind_device`` ran."""
    return _STATE.device


def release_device() -> None:
    """Forget the bound device and drop its claim (the end of a rank's run)."""
    if _STATE.claim is not None:
        try:
            if _STATE.claim_path:
                os.unlink(_STATE.claim_path)
        except OSError:
            pass
        os.close(_STATE.claim)
    _STATE.claim = _STATE.claim_path = None
    _STATE.device, _STATE.simulated, _STATE.backend = None, False, None


def _claim(device: str, rank: int, run_key: str) -> None:
    folder = Path(tempfile.gettempdir()) / f"shardwise-devices-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(run_key.encode()).hexdigest()[:16]
    path = folder / f"{key}-{device.replace(':', '')}.claim"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        _violation(f"rank {rank} and rank {holder} both claim {device} on this host: one GPU per local rank")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(rank).encode(), 0)
    _STATE.claim, _STATE.claim_path = fd, str(path)


def init_group(backend: str | None = None, **kwargs) -> None:
    """Create the default process group for the bound device (``bind_device`` first).

    ``backend`` defaults to the device's (``backend_for``). Simulated GPUs run gloo, declared as the
    backend asked for (``"gloo"`` counts as the CUDA run's ``backend_for``), so the checks judge the
    group a GPU run would have: asked for ``"nccl"``, host tensors have no CPU backend to go through.
    """
    device = _STATE.device
    if device is None:
        if checking():
            _violation("the process group was created before this rank's device was bound")
        device = "cpu"
    declared = backend or backend_for(device)
    if _STATE.simulated and declared == "gloo":  # a CPU launcher's default: judge the group a GPU run gets
        declared = backend_for(device)
    _STATE.backend = declared
    dist.init_process_group("gloo" if _STATE.simulated else declared, **kwargs)


def run_key(init_method: str | None = None) -> str:
    """What names one run on this host for device claims: its rendezvous address."""
    if init_method:
        return init_method
    return "{}:{}:{}".format(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                             os.environ.get("TORCHELASTIC_RUN_ID", ""))


def setup_rank(device: str, rank: int, start_rank: int = 0, devices: Sequence[str] | None = None,
               local_ranks: int = 1, init_method: str | None = None, backend: str | None = None,
               **group_kwargs) -> str:
    """A rank's start in one call: its device (``rank_device``), bound, then its process group."""
    mine = rank_device(device, rank, start_rank, devices, local_ranks)
    bind_device(mine, rank, run_key(init_method))
    if init_method is not None:
        group_kwargs["init_method"] = init_method
        group_kwargs.setdefault("rank", rank)
    init_group(backend, **group_kwargs)
    return mine


# -- placing tensors ---------------------------------------------------------------------------------


def torch_device(device: str | torch.device) -> torch.device:
    """The torch device that backs ``device``: CPU for a simulated GPU."""
    device = str(device)
    if _STATE.simulated and device == _STATE.device:
        return torch.device("cpu")
    return torch.device(device)


def put(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``t`` on ``device`` (on a simulated GPU: marked as a device tensor, no copy)."""
    device = str(device)
    if _STATE.simulated and device == _STATE.device:
        return t if isinstance(t, SimulatedDeviceTensor) else t.as_subclass(SimulatedDeviceTensor)
    return t.to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory, as a plain tensor."""
    t = t.cpu()
    return t.as_subclass(torch.Tensor) if isinstance(t, SimulatedDeviceTensor) else t


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (timings); nothing to wait for on CPU or a simulated GPU."""
    if torch_device(device).type == "cuda":
        torch.cuda.synchronize(device)


def state_to_device(state: dict[str, torch.Tensor], device: str | torch.device,
                    staging_bytes: int = STAGING_BYTES, pinned: bool | None = None) -> dict[str, torch.Tensor]:
    """Move a loaded state dict to ``device`` tensor by tensor, dropping each host tensor once copied.

    On CUDA the bytes go through two pinned staging buffers of ``staging_bytes`` each: while the
    GPU copies one buffer (asynchronously, on the current stream) the CPU fills the other, and a
    buffer is refilled only after its copy has finished (an event per buffer). Host memory in use
    is the loaded shard (mapped pages of the checkpoint and the copy arena) plus the two buffers, never
    a second full host copy (``tensor.pin_memory()`` or ``module.to`` from pageable memory would make
    one, or stage the whole tensor). On a simulated GPU the tensors are only marked; on CPU nothing
    changes. ``pinned=False`` runs the same chunked copy without pinned memory (for tests on CPU).
    """
    target = torch_device(device)
    if target.type == "cpu" and pinned is None:
        if _STATE.simulated and str(device) == _STATE.device:
            return {n: put(t, device) for n, t in state.items()}
        return state
    use_pinned = torch.cuda.is_available() if pinned is None else pinned
    buffers = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=use_pinned) for _ in range(2)]
    events: list = [None, None]
    cuda = target.type == "cuda"
    which = 0
    out: dict[str, torch.Tensor] = {}
    for name in list(state):
        src = state.pop(name)
        dst = torch.empty(src.shape, dtype=src.dtype, device=target)
        out[name] = dst
        if not src.numel():
            continue
        src_bytes = src.contiguous().reshape(-1).view(torch.uint8)  # loaded tensors are contiguous: a view
        dst_bytes = dst.reshape(-1).view(torch.uint8)
        for start in range(0, src_bytes.numel(), staging_bytes):
            part = src_bytes[start:start + staging_bytes]
            if events[which] is not None:
                events[which].synchronize()  # the GPU is done reading this buffer
            stage = buffers[which][:part.numel()]
            stage.copy_(part)
            dst_bytes[start:start + part.numel()].copy_(stage, non_blocking=cuda)
            if cuda:
                events[which] = torch.cuda.Event()
                events[which].record()
            which ^= 1
        del src, src_bytes  # the host tensor goes as soon as its bytes are queued
    if cuda:
        torch.cuda.current_stream(target).synchronize()
    return out


# -- checks ------------------------------------------------------------------------------------------


def _violation(message: str) -> None:
    _STATE.violations += 1
    raise DeviceCheckError(f"device check failed: {message}")


def _describe(t: torch.Tensor) -> str:
    return f"{'host' if not _on_device(t) else 'device'} {str(t.dtype).replace('torch.', '')} tensor {list(t.shape)}"


def _on_device(t: torch.Tensor) -> bool:
    if _STATE.simulated:
        return isinstance(t, SimulatedDeviceTensor)
    return _STATE.device is not None and t.device == torch.device(_STATE.device)


def check_collective(op: str, tensors: Sequence[torch.Tensor] = (), host: bool = False) -> None:
    """Check one collective against the GPU rules (device checks on); counts it."""
    _STATE.checked += 1
    if _STATE.device is None:
        _violation(f"{op} ran before this rank's device was bound (bind_device must run before init_process_group)")
    declared = _STATE.backend or backend_for(_STATE.device)
    on_gpu = _STATE.device.startswith("cuda")
    for t in tensors:
        if host:
            if on_gpu and "cpu:" not in declared and declared != "gloo":
                _violation(f"rank {_STATE.rank}: {op} of a host tensor on a group without a CPU backend ({declared})")
        elif on_gpu and not _on_device(t):
            _violation(f"rank {_STATE.rank}: {_describe(t)} reached device collective {op}; this rank's device is "
                       f"{_STATE.device}")


def plain(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind a simulated device tensor (same storage), for the transports."""
    return t.as_subclass(torch.Tensor) if isinstance(t, SimulatedDeviceTensor) else t


def like(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``result`` marked as a device tensor if ``source`` was one."""
    if isinstance(source, SimulatedDeviceTensor) and not isinstance(result, SimulatedDeviceTensor):
        return result.as_subclass(SimulatedDeviceTensor)
    return result


def checked_count() -> tuple[int, int]:
    """(collectives checked, violations) in this process since its device was bound."""
    return _STATE.checked, _STATE.violations


def log_report(rank: int) -> None:
    """Rank 0, at the end of a run with device checks on: the one summary line."""
    if checking() and rank == 0:
        log.info("device checks: %d collectives checked, %d violations", _STATE.checked, _STATE.violations)
