"""The program half of a launched model: where the user's ``get_model`` lives and what it is called with.

Ranks are fresh processes, so they cannot receive the model object: each one imports the builder by
name and calls it. The same record, written to ``program.json`` by ``ParallelModel.save``, is what
``shardwise.load`` rebuilds from (NxD's traced program, here plain Python re-imported), so it must be
an importable module-level function with JSON arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ShardwiseError


@dataclass(frozen=True)
class Builder:
    """``module:qualname`` (or a script file for ``__main__``) plus the arguments to call it with."""

    module: str
    qualname: str
    file: str | None = None  # the script, when the builder is defined in the caller's __main__
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, fn: Callable[..., nn.Module], args: tuple = (), kwargs: dict | None = None) -> Builder:
        if isinstance(fn, Builder):
            return fn
        if not callable(fn):
            raise ShardwiseError(f"get_model must be a function that returns a torch module, not {type(fn).__name__}")
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module is None or "<" in qualname or "." in qualname:
            raise ShardwiseError(f"get_model must be a module-level function (ranks import it by name); "
                                 f"{qualname or fn!r} is not")
        file = None
        if module == "__main__":
            main = sys.modules["__main__"]
            file = getattr(main, "__file__", None)
            if file is None:
                raise ShardwiseError("get_model is defined in an interactive session; ranks import it by name, so "
                                     "put it in a module or script file")
            file = str(Path(file).resolve())
        kwargs = dict(kwargs or {})
        try:
            json.dumps([list(args), kwargs])
        except (TypeError, ValueError):
            raise ShardwiseError("get_model's arguments must be JSON values (numbers, strings, lists, dicts): they are "
                                 "saved with the program") from None
        return cls(module, qualname, file, tuple(args), kwargs)

    def function(self) -> Callable[..., nn.Module]:
        try:
            if self.file is not None:
                name = "__mp_main__" if "__mp_main__" in sys.modules else "shardwise_user_program"
                mod = sys.modules.get(name)
                if mod is None or str(Path(getattr(mod, "__file__", None) or "").resolve()) != self.file:
                    spec = importlib.util.spec_from_file_location("shardwise_user_program", self.file)
                    if spec is None or spec.loader is None:
                        raise ImportError(self.file)
                    mod = importlib.util.module_from_spec(spec)
                    sys.modules["shardwise_user_program"] = mod
                    spec.loader.exec_module(mod)
            else:
                mod = importlib.import_module(self.module)
            return getattr(mod, self.qualname)
        except (ImportError, AttributeError, OSError) as exc:
            where = self.file or self.module
            raise ShardwiseError(f"cannot import the model builder {self.qualname} from {where}: {exc}") from None

    def build(self) -> nn.Module:
        model = self.function()(*self.args, **self.kwargs)
        if not isinstance(model, nn.Module):
            raise ShardwiseError(f"{self.qualname}() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def to_json(self) -> dict:
        return {"module": self.module, "qualname": self.qualname, "file": self.file, "args": list(self.args),
                "kwargs": self.kwargs}

    @classmethod
    def from_json(cls, data: object, where: str) -> Builder:
        try:
            assert isinstance(data, dict)
            module, qualname, file = data["module"], data["qualname"], data.get("file")
            args, kwargs = data.get("args", []), data.get("kwargs", {})
            assert isinstance(module, str) and isinstance(qualname, str) and (file is None or isinstance(file, str))
            assert isinstance(args, list) and isinstance(kwargs, dict)
        except (AssertionError, KeyError):
            raise ShardwiseError(f"{where}: `builder` needs module, qualname, args and kwargs") from None
        return cls(module, qualname, file, tuple(args), kwargs)
