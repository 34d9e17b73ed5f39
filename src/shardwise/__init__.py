"""shardwise: tensor-parallel inference from Hugging Face checkpoints, sharded by a declarative plan."""

from .config import ModelConfig, load_config
from .conformance import model_layout
from .custom import Buckets, ParallelModel, apply_plan, launch, load
from .engine import Completion, Engine, EngineOptions
from .errors import ShardwiseError
from .generation import Sampling, generate
from .layout import Layout, compute_layout
from .mesh import Mesh
from .plan import Plan, builtin_plan, load_plan, resolve_plan
from .runner import RunOptions, RunResult, run
from .sharded_model import ShardedModel, load_sharded
from .speculative import Speculation, SpeculationStats, speculative_generate

__all__ = [
    "Buckets", "Completion", "Engine", "EngineOptions", "Layout", "Mesh", "ModelConfig", "ParallelModel", "Plan",
    "RunOptions", "RunResult", "Sampling", "ShardedModel", "ShardwiseError", "Speculation", "SpeculationStats",
    "apply_plan", "builtin_plan", "compute_layout", "generate", "launch", "load", "load_config", "load_plan",
    "load_sharded", "model_layout", "resolve_plan", "run", "speculative_generate",
]
__version__ = "0.1.0"
