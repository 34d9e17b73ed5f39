"""The family seam: a new decoder family is one module (config, shapes, model, plan) plus a registration.

The toy family below is everything shardwise needs to know about a model it has never seen; the test
then loads it tensor-parallel through the same loader, layout and generation as the Llama family, and
checks the output against the same model on one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shardwise.config import ModelConfig, common_fields, config_from_dict
from shardwise.families import BUILT_IN, Family, family, register
from shardwise.generation import generate
from shardwise.parallel.launch import launch

# ---------------------------------------------------------------------------------------------- the toy family


def read_config(raw: dict, architecture: str) -> ModelConfig:
    return ModelConfig(**common_fields(raw, architecture, "toy"))


def shapes(config: ModelConfig, dtype: str = "BF16") -> dict:
    v, h, i = config.vocab_size, config.hidden_size, config.intermediate_size
    return {name: (shape, dtype) for name, shape in
            {"embed.weight": (v, h), "up.weight": (i, h), "down.weight": (h, i), "head.weight": (v, h)}.items()}


class ToyForCausalLM(nn.Module):
    """A one-block decoder without attention: enough to show the seam, small enough to read."""

    output_kind = "logits"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def prepare(self, max_len: int, device="cpu") -> None:
        pass  # no position tables

    def forward(self, input_ids, position_ids, mask, cache, start, last_only=True):
        x = self.embed(input_ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x[:, -1:] if last_only else x)


PLAN = """
tp_splits: {embed.weight: [pad, even], up.weight: [pad, null], down.weight: [null, pad], head.weight: [pad, null]}
groups: [[up.weight, down.weight]]
output: head
sharding:
  embed.weight: [tensor, null]
  up.weight: [tensor, null]
  down.weight: [null, tensor]
  head.weight: [tensor, null]
  head: [null, null, null]
"""

register(Family(name="toy", architectures=("ToyForCausalLM",), read_config=read_config, state_dict_shapes=shapes,
                model=f"{__name__}:ToyForCausalLM", plan_text=lambda: PLAN))

# ---------------------------------------------------------------------------------------------- tests

RAW = {"architectures": ["ToyForCausalLM"], "vocab_size": 51, "hidden_size": 16, "intermediate_size": 30,
       "num_hidden_layers": 1, "num_attention_heads": 4, "torch_dtype": "float32"}
PROMPTS = [[3, 9, 4, 1], [7, 2]]


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy")
    (path / "config.json").write_text(json.dumps(RAW))
    gen = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(*s, generator=gen) for n, (s, _) in shapes(config_from_dict(RAW)).items()},
              str(path / "model.safetensors"))
    return path


def _reference(path: Path) -> list[list[int]]:
    model = family("toy").build(config_from_dict(RAW))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return generate(model.eval(), PROMPTS, 6, 0, ()).tokens


def _rank(rank: int, world: int, path: str, out: str) -> None:
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(path)
    tokens = generate(sharded.module, PROMPTS, 6, 0, (), comm=sharded.comm).tokens
    if rank == 0:
        Path(out).write_text(json.dumps(tokens))


def test_config_reading_finds_the_registered_family():
    config = config_from_dict(RAW)
    assert config.family == "toy" and config.architecture == "ToyForCausalLM"
    assert isinstance(family("toy").build(config), ToyForCausalLM)


@pytest.mark.slow
def test_a_registered_family_runs_tensor_parallel(toy_checkpoint, tmp_path):
    out = tmp_path / "tokens.json"
    launch(_rank, 2, (str(toy_checkpoint), str(out)))
    assert json.loads(out.read_text()) == _reference(toy_checkpoint)


def test_a_built_in_family_is_one_folder():
    """What adding a family takes: its folder (config, shapes, model, plan) and its name in the registry."""
    root = Path(__file__).resolve().parent.parent / "src" / "shardwise" / "families"
    for name in BUILT_IN:
        assert sorted(p.name for p in (root / name).iterdir() if p.suffix in (".py", ".yaml")) == \
            ["__init__.py", "config.py", "model.py", "plan.yaml"]
    # Nothing outside the families folder names a model class.
    src = root.parent
    for py in src.rglob("*.py"):
        if root not in py.parents:
            assert "LlamaForCausalLM(" not in py.read_text(), py
