"""The device mesh: named axes with sizes, and each rank's coordinate on them.

Ranks are laid out row-major over the axes (the last axis varies fastest), the same convention as
``torch.distributed.device_mesh.DeviceMesh``, so a mesh built here maps one-to-one onto a DeviceMesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ShardwiseError


@dataclass(frozen=True)
class Mesh:
    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.axis_names) != len(self.axis_sizes):
            raise ShardwiseError("mesh: every axis needs exactly one size")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ShardwiseError(f"mesh: axis names repeat: {list(self.axis_names)}")
        for name, size in zip(self.axis_names, self.axis_sizes):
            if size < 1:
                raise ShardwiseError(f"mesh: axis {name!r} has size {size}; it must be at least 1")

    @classmethod
    def tensor_only(cls, tp_degree: int) -> Mesh:
        """The mesh of plain tensor parallelism: one ``tensor`` axis of ``tp_degree`` ranks."""
        return cls(("tensor",), (int(tp_degree),))

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """``--mesh fsdp=2,tensor=2``: axis sizes as torchprime's ``ici_mesh.fsdp=2`` overrides give them.

        Axes keep the order written (the last varies fastest over ranks); sizes of 1 are allowed.
        """
        names: list[str] = []
        sizes: list[int] = []
        for part in str(text).split(","):
            name, eq, value = part.strip().partition("=")
            name = name.strip()
            if not eq or not name or not name.replace("_", "").isalnum():
                raise ShardwiseError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...], e.g. fsdp=2,tensor=2")
            try:
                size = int(value.strip())
            except ValueError:
                raise ShardwiseError(f"--mesh {text!r}: the size of axis {name!r} is not an integer: "
                                     f"{value.strip()!r}") from None
            if size < 1:
                raise ShardwiseError(f"--mesh {text!r}: axis {name!r} has size {size}; sizes are at least 1")
            if name in names:
                raise ShardwiseError(f"--mesh {text!r}: axis {name!r} is given twice")
            names.append(name)
            sizes.append(size)
        return cls(tuple(names), tuple(sizes))

    def describe(self) -> str:
        """``fsdp=2 x tensor=4``: how the mesh is written in messages."""
        return " x ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes))

    @property
    def world_size(self) -> int:
        return math.prod(self.axis_sizes)

    def size(self, axis: str) -> int:
        return self.axis_sizes[self._index(axis)]

    def coordinate(self, rank: int, axis: str) -> int:
        """Position of ``rank`` along ``axis``."""
        idx = self._index(axis)
        stride = math.prod(self.axis_sizes[idx + 1 :])
        return (rank // stride) % self.axis_sizes[idx]

    def _index(self, axis: str) -> int:
        try:
            return self.axis_names.index(axis)
        except ValueError:
            raise ShardwiseError(f"mesh has no axis {axis!r}; its axes are {list(self.axis_names)}") from None
