"""Reading the small documents shardwise is handed (configs, indexes, manifests, plans, partition configs).

Every such file is untrusted input: it may be missing, unreadable, not UTF-8, not valid JSON/YAML,
nested deeply enough to exhaust the parser's recursion, or a valid document of the wrong type. Each of
these becomes one ``ShardwiseError`` line naming the file, instead of the parser's own exception type
(``JSONDecodeError``, ``UnicodeDecodeError``, ``RecursionError``...) escaping as a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ShardwiseError

# Far above any real config, index or plan; a bound so a hostile file cannot make us read gigabytes.
MAX_DOCUMENT_BYTES = 64 << 20


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (parsers spread theirs over several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_text(path: str | Path, what: str) -> str:
    """The file's text, or a one-line error naming ``what`` it was meant to be."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise ShardwiseError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ShardwiseError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ShardwiseError(f"{path}: {what} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardwiseError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | Path, what: str, kind: type = dict) -> Any:
    """A JSON document of type ``kind`` (an object by default)."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShardwiseError(f"{path}: {what} is not valid JSON ({one_line(exc)})") from None
    return expect(data, kind, path, what)


def parse_yaml(text: str, where: str, what: str) -> Any:
    """A YAML document parsed safely (no Python objects), errors as one line naming ``where``."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it
    try:
        return yaml.load(text, Loader=loader)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ShardwiseError(f"{where}: {what} is not valid YAML ({one_line(exc)})") from None


def expect(data: Any, kind: type, path: str | Path, what: str) -> Any:
    """``data`` if it is a ``kind``, else a one-line error saying what was found instead."""
    if not isinstance(data, kind):
        names = {dict: "an object", list: "a list"}
        raise ShardwiseError(f"{path}: {what} must be {names.get(kind, kind.__name__)}, "
                             f"not {type(data).__name__}")
    return data
