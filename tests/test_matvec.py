"""matvec.py: in a compiled CPU step, linears of a few rows become a fused multiply-and-sum; wider ones stay
library matrix products; results match the eager module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardwise
from shardwise.compiled_decode import CompiledDecode
from shardwise.matvec import MatvecAsReduction, max_rows


class _Mlp(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.up = nn.Linear(24, 40, dtype=dtype)
        self.down = nn.Linear(40, 24, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x))) + x


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_few_row_linears_become_reductions_with_the_eager_result(dtype, atol, rows):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = _Mlp(dtype)
    x = torch.randn(rows, 1, 24, dtype=dtype)
    rewrite = MatvecAsReduction()
    # No compile cache: a cached graph would skip the pass, and the count below would be 0.
    compiled = torch.compile(module, dynamic=False, options={"pre_grad_custom_pass": rewrite, "fx_graph_cache": False})
    with torch.no_grad():
        out, ref = compiled(x), module(x)
    # Both linears are rewritten when the rows are few (max_rows for the dtype), neither otherwise.
    assert rewrite.rewritten == (2 if rows <= max_rows(dtype) else 0)
    assert max_rows(torch.float32) == 4 and max_rows(torch.bfloat16) == 1  # where the reduction won, measured
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=atol)


def test_a_linear_reading_a_rewritten_linear_is_rewritten_too():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 16, bias=False), nn.Linear(16, 8))
    x = torch.randn(1, 24)
    rewrite = MatvecAsReduction()
    compiled = torch.compile(module, dynamic=False, options={"pre_grad_custom_pass": rewrite, "fx_graph_cache": False})
    with torch.no_grad():
        assert torch.allclose(compiled(x), module(x), atol=1e-5)
    assert rewrite.rewritten == 3


def test_compiled_decode_uses_the_reduction_on_a_cpu_unless_turned_off(tiny_models, monkeypatch):
    sharded = shardwise.load_sharded(tiny_models["gqa9_tied"])
    assert isinstance(CompiledDecode(sharded.module).matvec, MatvecAsReduction)
    monkeypatch.setenv("SHARDWISE_MATVEC_REDUCTION", "0")
    assert CompiledDecode(sharded.module).matvec is None
    monkeypatch.setenv("SHARDWISE_MATVEC_REDUCTION", "maybe")
    with pytest.raises(shardwise.ShardwiseError, match="SHARDWISE_MATVEC_REDUCTION"):
        CompiledDecode(sharded.module)
