"""The resident engine: load a sharded model once, then serve calls (and a server) from one process."""

from .engine import Engine, RequestHandle
from .types import Completion, EngineBusy, EngineClosed, EngineOptions, SwapReport, TokenEvent

__all__ = ["Completion", "Engine", "EngineBusy", "EngineClosed", "EngineOptions", "RequestHandle", "SwapReport",
           "TokenEvent"]
