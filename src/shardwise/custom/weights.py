"""Weights of a launched model, kept apart from its program (NxD's ``inline_weights_to_neff=False``).

* ``load_checkpoint``: an unsharded HF checkpoint, each rank reading only its slices through the
  same loader and layout as ``shardwise run`` (byte ranges mapped, the rest copied).
* ``load_state``: a whole state dict handed over in memory, sliced by the layout.
* ``save_rank`` / ``load_saved``: one safetensors file per rank (the pre-sharded file naming,
  ``weights/tp{r}_sharded_checkpoint.safetensors``), each rank writing its own under a temporary name;
  the manifest (``manifest.json``: TP degree, per-rank file sha256 and size, each tensor's global and
  local shapes) is written by the caller once every rank has finished, and checked on load. A
  launched model's weights may have been replaced in memory, so unlike ``shardwise shard`` there is
  no source checkpoint to hash: the rank files themselves are the record.
* ``replace_into``: copy new weights into the live parameters (no module rebuilt).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointSource
from ..errors import ShardwiseError
from ..fileio import file_sha256
from ..layout import Layout
from ..loader import load_rank_state
from ..presharded import rank_file
from ..untrusted import read_json
from .plans import slice_tensor

FORMAT = "shardwise-custom"
VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "program.json"


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_shapes(layout: Layout, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every parameter of the model is in ``found`` with its global shape; one line naming the first that is not."""
    missing = [n for n in layout.tensors if n not in found]
    if missing:
        raise ShardwiseError(f"{where} lacks {len(missing)} of the model's {len(layout.tensors)} parameters, e.g. "
                             f"{missing[0]} of shape {_shape(layout.tensors[missing[0]].shape)}")
    for name, t in layout.tensors.items():
        if tuple(found[name]) != t.shape:
            raise ShardwiseError(f"{name}: the model has shape {_shape(t.shape)} but {where} holds "
                                 f"{_shape(found[name])}")


def load_checkpoint(layout: Layout, path: str | Path, rank: int, dtype: torch.dtype,
                    threads: int = 4) -> dict[str, torch.Tensor]:
    """This rank's slices of every parameter, read from an unsharded safetensors checkpoint."""
    source = CheckpointSource(path)
    found = source.shapes()
    check_shapes(layout, {n: s for n, (s, _) in found.items()}, str(path))
    by_source = replace(layout, tensors={n: replace(t, dtype=found[n][1]) for n, t in layout.tensors.items()})
    state, _ = load_rank_state(source, by_source, rank, dtype, threads)
    return state


def load_state(layout: Layout, full: dict[str, torch.Tensor], rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's slices of a whole (unsharded) state dict."""
    return {n: slice_tensor(full[n].to(dtype), t.shards[rank]) for n, t in layout.tensors.items()}


def assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Adopt loaded tensors as the parameters (no copy); anything left on meta is an error."""
    model.load_state_dict(state, strict=False, assign=True)
    unset = [n for n, p in model.named_parameters() if p.is_meta]
    if unset:
        raise ShardwiseError(f"no weights were given for {len(unset)} parameters, e.g. {unset[0]} (give a checkpoint, "
                             "or build the model with its weights)")


@torch.no_grad()
def replace_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy new local weights into the live parameters, in place: modules, compiled graphs and views stay valid."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def save_rank(model: nn.Module, directory: str | Path, rank: int) -> dict:
    """Write this rank's parameters to its rank file (temporary name, then renamed); its sha256 and size."""
    from safetensors.torch import save_file

    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "rank": str(rank)})
    digest = file_sha256(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return {"sha256": digest, "bytes": size}



def write_manifest(directory: str | Path, layout: Layout, files: list[dict], dtype: torch.dtype) -> None:
    manifest = {
        "format": FORMAT, "version": VERSION, "tp_degree": layout.mesh.world_size, "dtype": str(dtype).removeprefix(
            "torch."),
        "files": files,
        "tensors": {n: {"shape": list(t.shape), "local": [list(s.local_shape) for s in t.shards]}
                    for n, t in layout.tensors.items()},
    }
    _atomic_write(Path(directory) / MANIFEST, json.dumps(manifest, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_program(directory: str | Path, program: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(directory) / PROGRAM, json.dumps(program, indent=1))


def read_saved(directory: str | Path) -> tuple[dict, dict]:
    """(program, manifest) of a saved model, checked enough that ranks can trust them; one line if not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardwiseError(f"{str(directory)!r} is not a directory saved by ParallelModel.save")
    for name in (PROGRAM, MANIFEST):
        if not (directory / name).is_file():
            raise ShardwiseError(f"{directory}: {name} is missing (not a directory saved by ParallelModel.save)")
    program = read_json(directory / PROGRAM, "saved program")
    manifest = read_json(directory / MANIFEST, "saved manifest")
    where = directory / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardwiseError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardwiseError(f"{where}: version {manifest.get('version')!r}; this shardwise reads version {VERSION}")
    tp, files, tensors = manifest.get("tp_degree"), manifest.get("files"), manifest.get("tensors")
    if (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1 or not isinstance(files, list) or len(files) != tp
            or not all(isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
                       for f in files) or not isinstance(tensors, dict)):
        raise ShardwiseError(f"{where}: needs tp_degree, one files entry (sha256, bytes) per rank, and tensors")
    if not isinstance(program, dict) or not isinstance(program.get("builder"), dict):
        raise ShardwiseError(f"{directory / PROGRAM}: needs a builder")
    for rank, entry in enumerate(files):
        path = rank_file(directory, rank)
        if not path.is_file():
            raise ShardwiseError(f"{directory}: the rank file of rank {rank} is missing ({path.name})")
        if path.stat().st_size != entry["bytes"]:
            raise ShardwiseError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                 "the file changed since it was saved")
    return program, manifest


def load_saved(layout: Layout, directory: str | Path, rank: int, manifest: dict) -> dict[str, torch.Tensor]:
    """This rank's saved tensors, after checking the file's hash and every tensor's shape against the model."""
    from safetensors import safe_open

    path = rank_file(directory, rank)
    if file_sha256(path) != manifest["files"][rank]["sha256"]:
        raise ShardwiseError(f"{path}: its sha256 differs from the manifest's: the file changed since it was saved")
    if manifest["tp_degree"] != layout.mesh.world_size:
        raise ShardwiseError(f"{directory} was saved at TP {manifest['tp_degree']}, the model runs at "
                             f"{layout.mesh.world_size}")
    state = {}
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        check_shapes(layout, {n: tuple(manifest["tensors"].get(n, {}).get("shape", ())) for n in names},
                     f"{path.name} (via the manifest)")
        for name, t in layout.tensors.items():
            value = f.get_tensor(name)
            if tuple(value.shape) != t.shards[rank].local_shape:
                raise ShardwiseError(f"{path}: {name} has shape {_shape(value.shape)}, rank {rank} of the model "
                                     f"holds {_shape(t.shards[rank].local_shape)}")
            state[name] = value
    return state
