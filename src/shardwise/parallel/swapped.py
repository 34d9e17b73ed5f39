"""Linears that compute with the split their weight is stored in, not the one their module usually has.

A plan may store a column-parallel weight (``q_proj``: output rows over ``tensor``) split by input
columns, or a row-parallel weight (``o_proj``: input columns over ``tensor``) split by output rows.
Gathering such a weight whole on every rank each forward moves the whole weight; computing with the
stored split moves activations only (``redistribute.py`` decides which, by cost). The modules here take
exactly the inputs and give exactly the outputs of the layer they replace, so the model around them,
sequence parallelism and generation see no difference:

* ``InputSplitLinear`` replaces a ``ColumnParallelLinear``: row-parallel compute, then each rank keeps
  its column-parallel output shard (its heads, with the layout's padding), or the whole output when the
  layer gathers it (one all-reduce instead of the all-gather);
* ``OutputSplitLinear`` replaces a ``RowParallelLinear``: column-parallel compute on the gathered input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Collectives
from .layers import ColumnParallelLinear


def _picker(index: list[int], size: int) -> tuple[int, int, int] | torch.Tensor:
    """How to take positions ``index`` (-1: a zero) out of the last dimension of a tensor of ``size`` features:
    ``(start, length, zeros)`` for a run of real positions followed by zeros, else an index into the tensor
    with one zero feature appended (at ``size``)."""
    real = [i for i in index if i >= 0]
    zeros = len(index) - len(real)
    if real and real == list(range(real[0], real[0] + len(real))) and index[: len(real)] == real:
        return real[0], len(real), zeros
    return torch.tensor([i if i >= 0 else size for i in index], dtype=torch.long)


def _pick(x: torch.Tensor, picker: tuple[int, int, int] | torch.Tensor) -> torch.Tensor:
    if isinstance(picker, tuple):
        start, length, zeros = picker
        x = x.narrow(-1, start, length)
        return F.pad(x, (0, zeros)) if zeros else x
    return F.pad(x, (0, 1)).index_select(-1, picker)


def _on(index, device: torch.device):
    """``index`` (a picker or positions) on ``device``: moved once, not at every forward."""
    return index.to(device) if isinstance(index, torch.Tensor) and index.device != device else index


class InputSplitLinear(ColumnParallelLinear):
    """A column-parallel linear whose weight is held split by input columns: computed row-parallel.

    The weight is ``[out_features, local in]``, the columns ``in_index`` of the source (-1: padding, zero
    weights). Each rank multiplies its columns of the whole input by it; the all-reduce of the partial
    products is the whole output ``x W^T``, of which each rank keeps its column-parallel rows
    (``local_index``, -1: a zero row, as a padded head has) and adds its bias shard; a layer that gathers
    its output returns it whole (it has no bias: ``redistribute.py`` keeps those gathered).
    It is a ``ColumnParallelLinear`` to the code that reads one (generation's on-device sampling turns
    ``gather_output`` off and reads ``local_index`` / ``gather_index``).
    """

    def __init__(self, in_features: int, out_features: int, in_index: list[int], local_index: list[int],
                 bias: bool = True, gather_output: bool = False, comm: Collectives | None = None,
                 gather_index: list[int] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, gather_output, comm, len(local_index), gather_index,
                         dtype, "meta", local_index)
        self.weight = nn.Parameter(torch.empty(out_features, len(in_index), dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(len(local_index), dtype=dtype, device=device))
        self.take_input = _picker(in_index, in_features)
        self.take_output = _picker(local_index, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.take_input, self.take_output = _on(self.take_input, x.device), _on(self.take_output, x.device)
        y = self.comm.all_reduce(F.linear(_pick(x, self.take_input), self.weight))
        if self.gather_output:
            return y
        y = _pick(y, self.take_output)
        return y + self.bias if self.bias is not None else y


class OutputSplitLinear(nn.Module):
    """A row-parallel linear whose weight is held split by output rows: computed column-parallel.

    The input arrives split by features as the row-parallel layer takes it (``local_in`` features per
    rank, e.g. whole heads); it is all-gathered and put in source order (``in_positions``: where each
    source feature lands in the concatenation, None when it is the first ``in_features``). Each rank
    computes its output rows (the weight is ``[local out, in_features]``) and they are all-gathered
    (``out_positions`` likewise). The bias is whole, added once.

    Why this composition: the alternative orders need the whole weight or a second pass. At decode the two
    all-gathers move ``(T-1)/T`` of the input and of the output, the row-parallel all-reduce they replace
    ``2(T-1)/T`` of the output: the same bytes where input and output are alike in size (attention's
    o_proj), more for down_proj (its input is the wider intermediate), and far less than the weight.
    """

    def __init__(self, in_features: int, out_features: int, local_in: int, local_out: int,
                 in_positions: list[int] | None, out_positions: list[int] | None, bias: bool = True,
                 comm: Collectives | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        from .comm import default_collectives

        self.comm = comm or default_collectives()
        self.in_features, self.out_features, self.local_in = in_features, out_features, local_in
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.in_positions = torch.tensor(in_positions) if in_positions is not None else None
        self.out_positions = torch.tensor(out_positions) if out_positions is not None else None

    def _place(self, x: torch.Tensor, positions: torch.Tensor | None, size: int) -> torch.Tensor:
        x = self.comm.all_gather(x.contiguous(), dim=-1)
        return x.index_select(-1, positions) if positions is not None else x[..., :size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_positions, self.out_positions = _on(self.in_positions, x.device), _on(self.out_positions, x.device)
        y = F.linear(self._place(x, self.in_positions, self.in_features), self.weight)
        y = self._place(y, self.out_positions, self.out_features)
        return y + self.bias if self.bias is not None else y
