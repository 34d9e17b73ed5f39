"""Hostile and broken checkpoints: safetensors headers validated as strictly as the safetensors library
validates them, index file names confined to the checkpoint directory, and pickle never unpickled.

The library is the reference: for every crafted file, it accepts exactly when we do (tensors identical),
except for dtypes shardwise has no use for (fp8, unsigned 16-64 bit...), which it reads and we refuse.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint import CheckpointSource, SliceReader, read_header
from shardwise.errors import ShardwiseError

F32x2 = '"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'
D8 = bytes(range(8))


def write_st(path: Path, header: dict | bytes | str, data: bytes = b"") -> Path:
    """A safetensors file from a header (dict, or raw JSON text/bytes) and the data section."""
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def library_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from the file (None if it refuses it, at any step)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # any refusal of the library counts as a refusal
        return None


def our_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read in full through shardwise (raises ShardwiseError if refused)."""
    source = CheckpointSource(directory)
    reader = SliceReader(source)
    try:
        for info in source.tensors.values():  # never anywhere but inside the file, after the header
            assert 8 <= info.begin <= info.end <= info.file.stat().st_size
        return {name: reader.source_view(name).clone() for name in source.tensors}
    finally:
        reader.close()


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (bytes, so that NaNs compare equal)."""
    def raw(t: torch.Tensor) -> bytes:  # booleans as 0/1: a bool byte of 2 is True, and copies make it 1
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        return (flat != 0 if t.dtype == torch.bool else flat).numpy().tobytes()

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and raw(a[k]) == raw(b[k]) for k in a)


def compare_with_library(directory: Path) -> str:
    """'accepted' or 'refused', after checking that we agree with the library about the file.

    Anything but ShardwiseError escaping from us is a failure of the caller's test.
    """
    library = library_tensors(directory / "model.safetensors")
    try:
        ours = our_tensors(directory)
    except ShardwiseError as exc:
        message = str(exc)
        assert "\n" not in message
        assert library is None or "not supported by shardwise" in message, \
            f"the library reads this file but we refuse it: {message}"
        return "refused"
    assert library is not None, "we accept a file the safetensors library refuses"
    assert same_tensors(ours, library), "we read other tensors than the library does"
    return "accepted"


def hdr(template: str, **parts: str) -> str:
    """Header JSON from a template: ``@T`` is a valid F32 [2] entry body, ``@A``, ``@B``... are ``parts``."""
    for key, value in parts.items():
        template = template.replace(f"@{key}", value)
    return template.replace("@T", F32x2)


def raw_case(header: str, data: bytes = D8, **parts: str) -> tuple[bytes, bytes]:
    return hdr(header, **parts).encode(), data


# name -> (raw header JSON, data section). Each is a file the library accepts or refuses for one reason.
CRAFTED = {
    "valid": raw_case(hdr('{"x": {@T}}')),
    "valid_with_metadata": raw_case(hdr('{"__metadata__": {"format": "pt"}, "x": {@T}}')),
    "metadata_last": raw_case(hdr('{"x": {@T}, "__metadata__": {"format": "pt"}}')),
    "metadata_null": raw_case(hdr('{"__metadata__": null, "x": {@T}}')),
    "metadata_list": raw_case(hdr('{"__metadata__": [], "x": {@T}}')),
    "metadata_int_value": raw_case(hdr('{"__metadata__": {"a": 1}, "x": {@T}}')),
    "metadata_null_value": raw_case(hdr('{"__metadata__": {"a": null}, "x": {@T}}')),
    "metadata_twice": raw_case(hdr('{"__metadata__": {}, "__metadata__": {}, "x": {@T}}')),
    "metadata_key_twice": raw_case(hdr('{"__metadata__": {"a": "b", "a": "c"}, "x": {@T}}')),
    "metadata_key_twice_bad_first": raw_case(hdr('{"__metadata__": {"a": 1, "a": "c"}, "x": {@T}}')),
    "metadata_shaped_like_a_tensor": raw_case(hdr('{"__metadata__": {@T}}')),
    "padded_with_spaces": raw_case(hdr('{"x": {@T}}      ')),
    "leading_whitespace": raw_case(hdr(' \n\t{"x": {@T}}\r\n')),
    "trailing_nul": raw_case(hdr('{"x": {@T}}\x00')),
    "trailing_garbage": raw_case(hdr('{"x": {@T}} x')),
    "byte_order_mark": raw_case(hdr('\ufeff{"x": {@T}}')),
    "empty_header": raw_case("{}", b""),
    "empty_header_with_data": raw_case("{}", b"x"),
    "empty_text": raw_case("", b""),
    "list_header": raw_case("[]"),
    "string_header": raw_case('"x"'),
    "null_header": raw_case("null"),
    "extra_field": raw_case(hdr('{"x": {@T, "z": [1, {"a": null}]}}')),
    "extra_field_twice": raw_case(hdr('{"x": {@T, "z": 1, "z": 2}}')),
    "field_twice": raw_case('{"x": {"dtype": "F32", "shape": [2], "shape": [2], "data_offsets": [0, 8]}}'),
    "entry_as_array": raw_case('{"x": ["F32", [2], [0, 8]]}'),
    "entry_as_short_array": raw_case('{"x": ["F32", [2]]}'),
    "entry_as_long_array": raw_case('{"x": ["F32", [2], [0, 8], 1]}'),
    "entry_as_array_wrong_order": raw_case('{"x": [[2], "F32", [0, 8]]}'),
    "entry_null": raw_case('{"x": null}', b""),
    "entry_empty": raw_case('{"x": {}}'),
    "entry_string": raw_case('{"x": "F32"}'),
    "missing_shape": raw_case('{"x": {"dtype": "F32", "data_offsets": [0, 0]}}', b""),
    "dtype_as_enum_object": raw_case('{"x": {"dtype": {"F32": null}, "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_object_with_value": raw_case('{"x": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_object_two_keys": raw_case('{"x": {"dtype": {"F32": null, "F16": null}, "shape": [2], '
                                      '"data_offsets": [0, 8]}}'),
    "dtype_object_key_twice": raw_case('{"x": {"dtype": {"F32": null, "F32": null}, "shape": [2], '
                                       '"data_offsets": [0, 8]}}'),
    "dtype_list": raw_case('{"x": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_unknown": raw_case('{"x": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_lowercase": raw_case('{"x": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_number": raw_case('{"x": {"dtype": 32, "shape": [2], "data_offsets": [0, 8]}}'),
    "dtype_fp8": raw_case('{"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}', D8[:2]),
    "dtype_u16": raw_case('{"x": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}', D8[:4]),
    "other_dtype_same_size": raw_case('{"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}'),
    "bf16": raw_case('{"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}'),
    "bool": raw_case('{"x": {"dtype": "BOOL", "shape": [8], "data_offsets": [0, 8]}}', bytes([0, 1] * 4)),
    "scalar": raw_case('{"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', D8[:4]),
    "empty_tensor": raw_case('{"x": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}', b""),
    "empty_tensors_share_an_offset": raw_case(
        '{"e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "x": {@T}, '
        '"f": {"dtype": "I8", "shape": [3, 0], "data_offsets": [0, 0]}}'),
    "empty_tensor_inside_another": raw_case(
        '{"e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}, "x": {@T}}'),
    "empty_huge_dims": raw_case('{"x": {"dtype": "F32", "shape": [0, 1099511627776, 1099511627776], '
                                '"data_offsets": [0, 0]}}', b""),
    "empty_dim_at_2_63": raw_case('{"x": {"dtype": "F32", "shape": [0, 9223372036854775808], '
                                  '"data_offsets": [0, 0]}}', b""),
    "empty_dim_max_torch": raw_case('{"x": {"dtype": "F32", "shape": [0, 9223372036854775807], '
                                    '"data_offsets": [0, 0]}}', b""),
    "empty_after_overflow": raw_case('{"x": {"dtype": "F32", "shape": [4611686018427387904, 4, 0], '
                                     '"data_offsets": [0, 0]}}', b""),
    "empty_before_overflow": raw_case('{"x": {"dtype": "F32", "shape": [0, 4611686018427387904, 4], '
                                      '"data_offsets": [0, 0]}}', b""),
    "shape_overflow": raw_case('{"x": {"dtype": "F32", "shape": [4294967296, 4294967296], '
                               '"data_offsets": [0, 8]}}'),
    "shape_float": raw_case('{"x": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}'),
    "shape_exponent": raw_case('{"x": {"dtype": "F32", "shape": [2e0], "data_offsets": [0, 8]}}'),
    "shape_negative": raw_case('{"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}'),
    "shape_minus_zero": raw_case('{"x": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b""),
    "shape_bool": raw_case('{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', D8[:4]),
    "shape_string": raw_case('{"x": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}'),
    "shape_null": raw_case('{"x": {"dtype": "F32", "shape": null, "data_offsets": [0, 0]}}', b""),
    "shape_number": raw_case('{"x": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}'),
    "shape_2_64": raw_case('{"x": {"dtype": "F32", "shape": [18446744073709551616], "data_offsets": [0, 8]}}'),
    "shape_too_big_for_data": raw_case('{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'),
    "many_dims": raw_case('{"x": {"dtype": "F32", "shape": [@A], "data_offsets": [0, 8]}}',
                          A=", ".join(["1"] * 99 + ["2"])),
    "offsets_reversed": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}'),
    "offsets_reversed_past_the_end": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [40, 8]}}'),
    "offsets_three": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}'),
    "offsets_one": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}'),
    "offsets_float": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}'),
    "offsets_strings": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}'),
    "offsets_object": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": {"0": 0, "1": 8}}}'),
    "offsets_negative": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}'),
    "offsets_minus_zero": raw_case('{"x": {"dtype": "F32", "shape": [0], "data_offsets": [-0, 0]}}', b""),
    "offsets_2_64": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 18446744073709551616]}}'),
    "offsets_past_the_end": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'),
    "gap_at_start": raw_case('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'),
    "gap_between": raw_case('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            '"y": {"dtype": "I8", "shape": [2], "data_offsets": [6, 8]}}'),
    "overlap": raw_case('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                        '"y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'),
    "same_range_twice": raw_case(hdr('{"x": {@T}, "y": {@T}}')),
    "two_tensors_out_of_order": raw_case('{"y": {"dtype": "I8", "shape": [4], "data_offsets": [4, 8]}, '
                                         '"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
    "trailing_data": raw_case(hdr('{"x": {@T}}'), D8 + b"x"),
    "truncated_data": raw_case(hdr('{"x": {@T}}'), D8[:7]),
    "name_twice": raw_case(hdr('{"x": {@T}, "x": {@T}}')),
    "name_twice_first_differs": raw_case('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                         '"x": {@T}}'),
    "name_twice_first_invalid": raw_case('{"x": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, '
                                         '"x": {@T}}'),
    "name_empty": raw_case(hdr('{"": {@T}}')),
    "name_escaped": raw_case('{"\\u0078": {"\\u0064type": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
    "name_surrogate_pair": raw_case(hdr('{"x\\ud83d\\ude00": {@T}}')),
    "name_lone_surrogate": raw_case(hdr('{"x\\ud800": {@T}}')),
    "metadata_lone_surrogate": raw_case(hdr('{"__metadata__": {"a": "\\udc00"}, "x": {@T}}')),
    "extra_lone_surrogate": raw_case(hdr('{"x": {@T, "z": ["\\ud800"]}}')),
    "name_control_character": raw_case(hdr('{"x\x01": {@T}}')),
    "nan_in_extra": raw_case(hdr('{"x": {@T, "z": NaN}}')),
    "infinity_in_extra": raw_case(hdr('{"x": {@T, "z": -Infinity}}')),
    "float_out_of_range": raw_case(hdr('{"x": {@T, "z": 1e309}}')),
    "float_largest": raw_case(hdr('{"x": {@T, "z": 1e308}}')),
    "float_underflow": raw_case(hdr('{"x": {@T, "z": 1e-400}}')),
    "long_integer": raw_case(hdr('{"x": {@T, "z": @A}}', A="9" * 300)),
    "integer_out_of_range": raw_case(hdr('{"x": {@T, "z": -@A}}', A="9" * 310)),
    "integer_past_python_digits": raw_case(hdr('{"x": {@T, "z": @A}}', A="9" * 5000)),
    "leading_zero": raw_case('{"x": {"dtype": "F32", "shape": [02], "data_offsets": [0, 8]}}'),
    "deep_127": raw_case(hdr('{"x": {@T, "z": @A@B}}', A="[" * 125, B="]" * 125)),
    "deep_128": raw_case(hdr('{"x": {@T, "z": @A@B}}', A="[" * 126, B="]" * 126)),
    "deep_objects_128": raw_case(hdr('{"x": {@T, "z": @A1@B}}', A='{"a": ' * 126, B="}" * 126)),
    "deep_500": raw_case(hdr('{"x": {@T, "z": @A@B}}', A="[" * 500, B="]" * 500)),
    "deep_100000": raw_case("[" * 100000 + "]" * 100000),
    "deep_100000_unclosed": raw_case('{"x": ' + "[" * 100000),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_we_accept_exactly_what_the_library_accepts(case, tmp_path):
    header, data = CRAFTED[case]
    write_st(tmp_path / "model.safetensors", header, data)
    compare_with_library(tmp_path)


def test_crafted_cases_cover_both_outcomes(tmp_path):
    """The table above is not all refusals: the library accepts a good share of it, and so do we."""
    outcomes = {}
    for case, (header, data) in CRAFTED.items():
        d = tmp_path / case
        write_st(d / "model.safetensors", header, data)
        outcomes[case] = compare_with_library(d)
    accepted = {c for c, o in outcomes.items() if o == "accepted"}
    assert {"valid", "entry_as_array", "dtype_as_enum_object", "metadata_null", "name_twice", "deep_127",
            "empty_huge_dims", "padded_with_spaces", "many_dims"} <= accepted
    assert len(accepted) >= 25 and len(outcomes) - len(accepted) >= 60


def header_error(tmp_path: Path, header: str | dict, data: bytes = D8) -> str:
    path = write_st(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ShardwiseError) as err:
        read_header(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize("header, data, expected", [
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [40, 8]}}', D8,
     "tensor 'x': data_offsets [40, 8] are reversed"),
    ('{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', D8,
     "tensor 'x': data_offsets [0, 8] hold 8 bytes, but shape [3] of F32 is 12 bytes"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', D8,
     "truncated: tensor 'x' ends at data byte 16 but the file has only 8 bytes of data"),
    ('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', D8,
     "data bytes 0..4 belong to no tensor (at the start of the data; tensor 'x' starts at 4)"),
    ('{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     '"y": {"dtype": "I8", "shape": [2], "data_offsets": [6, 8]}}', D8,
     "data bytes 4..6 belong to no tensor (after tensor 'x'; tensor 'y' starts at 6)"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', D8,
     "tensor 'y' (data bytes 4..8) overlaps tensor 'x', which ends at 8"),
    (hdr('{"x": {@T}}'), D8 + b"extra",
     "5 bytes after the last tensor's data belong to no tensor (tensors end at data byte 8, the file at 13)"),
    ('{"x": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}', D8, "tensor 'x': unknown dtype 'F33'"),
    ('{"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}', D8[:2],
     "tensor 'x': dtype F8_E4M3 is not supported by shardwise"),
    ('{"x": {"dtype": true, "shape": [2], "data_offsets": [0, 8]}}', D8, "dtype must be a string, got true"),
    ('{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', D8,
     "shape must be a list of non-negative integers, got [true]"),
    ('{"x": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}', D8, "got [2.5]"),
    ('{"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', D8, "got [-2]"),
    ('{"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', D8, 'got "2"'),
    ('{"x": {"dtype": "F32", "shape": [9223372036854775808, 0], "data_offsets": [0, 0]}}', b"",
     "has a size over 2**63 - 1"),
    ('{"x": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}}', b"",
     "has more than 2**64 elements"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}', D8,
     "data_offsets must be two non-negative integers [begin, end], got [0, 8, 8]"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', D8, "got [-8, 0]"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [false, 8]}}', D8, "got [false, 8]"),
    ('{"x": {"dtype": "F32", "shape": [2]}}', D8, "tensor 'x': the entry has no 'data_offsets'"),
    ('{"x": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', D8, "'dtype' appears twice"),
    ('{"x": 7}', D8, "tensor 'x': an entry is an object with dtype, shape and data_offsets, not a number"),
    ('[1, 2]', D8, "safetensors header must be a JSON object, not an array"),
    ('{"x": ', D8, "safetensors header is not valid JSON"),
    ("[" * 100000, D8, "nested too deeply"),
    (hdr('{"x": {@T, "z": @A@B}}', A="[" * 200, B="]" * 200), D8, "field 'z' is JSON nested over 127 deep"),
    (hdr('{"__metadata__": ["format"], "x": {@T}}'), D8, "__metadata__ must be an object of strings, not an array"),
    (hdr('{"__metadata__": {"format": {"a": 1}}, "x": {@T}}'), D8, "__metadata__ 'format' must be a string"),
    ('{"__metadata__": {}, "__metadata__": {}}', b"", "__metadata__ appears twice"),
    (hdr('{"x\\udc00": {@T}}'), D8, "the name is not valid Unicode"),
    (hdr('{"x": {@T, "z": NaN}}'), D8, "NaN is not JSON"),
])
def test_each_violation_is_one_line_naming_the_numbers(tmp_path, header, data, expected):
    assert expected in header_error(tmp_path, header, data)


def test_length_field_and_encoding(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ShardwiseError, match="too short for a header"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(ShardwiseError, match="header length 100000001 is over the 100000000-byte limit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(ShardwiseError, match="not a safetensors file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 50) + b"{}")
    with pytest.raises(ShardwiseError, match="truncated or not a safetensors file: the header length says 50 bytes "
                                             "but only 2 follow it"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 0))
    with pytest.raises(ShardwiseError, match="not valid JSON"):
        read_header(path)
    assert "header is not UTF-8 (byte 3 of the header)" in header_error(tmp_path, b'{"x\xff": {}}')


def test_offsets_stay_absolute_and_real_files_are_untouched(tmp_path):
    """TensorInfo's begin/end are absolute file offsets; files written by the library read as before."""
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
               "c": torch.zeros(0, 4, dtype=torch.bfloat16), "d": torch.tensor(3.5, dtype=torch.float64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos = read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert min(i.begin for i in infos.values()) == 8 + n
    assert max(i.end for i in infos.values()) == path.stat().st_size
    assert infos["a"].shape == (2, 3) and infos["a"].end - infos["a"].begin == 24
    assert same_tensors(our_tensors(tmp_path), tensors)


def test_rank_files_padded_with_spaces_are_valid(tmp_path):
    """presharded.py pads its header JSON with spaces to 8 bytes and tiles its data exactly."""
    header = json.dumps({"__metadata__": {"format": "pt", "rank": "0"}, **{
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [0], "data_offsets": [12, 12]},
        "c": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}}, separators=(",", ":"))
    header += " " * (-len(header) % 8)
    path = write_st(tmp_path / "model.safetensors", header, bytes(16))
    assert (8 + len(header)) % 8 == 0 and set(read_header(path)) == {"a", "b", "c"}
    assert compare_with_library(tmp_path) == "accepted"


# --- the index and the files it names ----------------------------------------------------------------


def two_file_checkpoint(root: Path, weight_map: dict | None = None, index_text: str | None = None) -> Path:
    """``a.safetensors`` (tensor x) and ``b.safetensors`` (tensor y), and an index (given or the right one)."""
    root.mkdir(parents=True, exist_ok=True)
    write_st(root / "a.safetensors", hdr('{"x": {@T}}'), D8)
    write_st(root / "b.safetensors", '{"y": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}', D8[:4])
    if index_text is None:
        index_text = json.dumps({"metadata": {}, "weight_map": weight_map or {"x": "a.safetensors",
                                                                              "y": "b.safetensors"}})
    (root / "model.safetensors.index.json").write_text(index_text)
    return root


def index_error(root: Path) -> str:
    with pytest.raises(ShardwiseError) as err:
        CheckpointSource(root)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_good_index_reads(tmp_path):
    source = CheckpointSource(two_file_checkpoint(tmp_path))
    assert set(source.tensors) == {"x", "y"} and [f.name for f in source.files] == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("index_text, expected", [
    ("{weight_map", "model.safetensors.index.json: checkpoint index is not valid JSON"),
    ("[]", "checkpoint index must be an object, not list"),
    ('{"metadata": {}}', "the index needs a `weight_map` object (tensor name -> file), got null"),
    ('{"weight_map": ["a.safetensors"]}', "the index needs a `weight_map` object (tensor name -> file), got an array"),
    ('{"weight_map": {"x": 1}}', "weight_map['x'] must be a file name, got 1"),
    ('{"weight_map": {"x": null}}', "weight_map['x'] must be a file name, got null"),
    ('{"weight_map": {"x": "/etc/passwd.safetensors"}}',
     "weight_map['x'] = '/etc/passwd.safetensors' is an absolute path"),
    ('{"weight_map": {"x": "../a.safetensors"}}', "weight_map['x'] = '../a.safetensors' is a path with '..'"),
    ('{"weight_map": {"x": "sub/../../a.safetensors"}}', "is a path with '..'"),
    ('{"weight_map": {"x": "a.safetensors\\u0000.bin"}}', "is not a valid file name"),
    ('{"weight_map": {"x": "a\\nb.safetensors"}}', "is not a valid file name"),
    ('{"weight_map": {"x": ""}}', "is an empty file name"),
    ('{"weight_map": {"x": "pytorch_model.bin"}}',
     "'pytorch_model.bin' is not a .safetensors file (shardwise reads only safetensors weights, never pickled"),
    ('{"weight_map": {"x": "c.safetensors"}}', "the index lists files that are missing: "),
    ('{"weight_map": {"x": "b.safetensors", "y": "b.safetensors"}}',
     "weight_map puts tensor 'x' in b.safetensors, whose header has no such tensor"),
    ('{"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}',
     "weight_map puts tensor 'y' in a.safetensors, whose header has no such tensor"),
    ('{"weight_map": {"z": "a.safetensors"}}', "weight_map puts tensor 'z' in a.safetensors, whose header has no"),
    ("[" * 100000, "checkpoint index is not valid JSON"),
])
def test_bad_indexes_are_one_line_errors(tmp_path, index_text, expected):
    message = index_error(two_file_checkpoint(tmp_path, index_text=index_text))
    assert expected in message and "model.safetensors.index.json" in message, message


def test_a_tensor_in_two_files_is_refused(tmp_path):
    root = two_file_checkpoint(tmp_path, {"x": "a.safetensors", "y": "b.safetensors"})
    write_st(root / "b.safetensors", hdr('{"x": {@T}, "y": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}'),
             D8 + D8[:4])
    assert "tensor 'x' is in two checkpoint files" in index_error(root)
    (root / "model.safetensors.index.json").unlink()  # the same without an index
    assert "tensor 'x' is in two checkpoint files" in index_error(root)


def test_subdirectories_inside_the_checkpoint_are_fine(tmp_path):
    root = two_file_checkpoint(tmp_path, {"x": "sub/a.safetensors", "y": "./b.safetensors"})
    (root / "sub").mkdir()
    (root / "a.safetensors").rename(root / "sub" / "a.safetensors")
    source = CheckpointSource(root)
    assert source.tensors["x"].file == root / "sub" / "a.safetensors" and set(source.tensors) == {"x", "y"}


def test_unreadable_index_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    root = two_file_checkpoint(tmp_path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("model.safetensors.index.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    message = index_error(root)
    assert "model.safetensors.index.json" in message and "Permission denied" in message


def test_hub_cache_symlinks_keep_working(tmp_path):
    """snapshots/<rev>/* are links to ../../blobs/<sha>: confinement is decided on names, not link targets."""
    from safetensors.torch import save_file

    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"x": torch.arange(4.0)},
              "model-00002-of-00002.safetensors": {"y": torch.ones(2, 3, dtype=torch.bfloat16)}}
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    for i, (name, tensors) in enumerate(shards.items()):
        save_file(tensors, str(blobs / f"sha{i}"))
        os.symlink(f"../../blobs/sha{i}", snapshot / name)
    (blobs / "shaindex").write_text(json.dumps(index))
    os.symlink("../../blobs/shaindex", snapshot / "model.safetensors.index.json")
    source = CheckpointSource(snapshot)
    assert set(source.tensors) == {"x", "y"}
    assert same_tensors(our_tensors(snapshot), {"x": torch.arange(4.0), "y": torch.ones(2, 3, dtype=torch.bfloat16)})
    single = repo / "snapshots" / "single"  # and the one-file layout, found without an index
    single.mkdir()
    os.symlink("../../blobs/sha0", single / "model.safetensors")
    assert set(CheckpointSource(single).tensors) == {"x"}


# --- pickle never runs ------------------------------------------------------------------------------


class _Payload:
    """Unpickled, this creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _malicious_checkpoint(root: Path, marker: Path, weights_name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with open(root / weights_name, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)
    return root


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The test below is only meaningful if unpickling this file really would create the marker."""
    marker = tmp_path / "marker"
    root = _malicious_checkpoint(tmp_path / "m", marker, "pytorch_model.bin")
    with open(root / "pytorch_model.bin", "rb") as f:
        pickle.load(f)  # deliberately, to show what the payload does
    assert marker.exists()


def test_pickled_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    root = _malicious_checkpoint(tmp_path / "bin-only", marker, "pytorch_model.bin")
    with pytest.raises(ShardwiseError, match="only PyTorch .bin weights found"):
        CheckpointSource(root)
    root = _malicious_checkpoint(tmp_path / "indexed", marker, "pytorch_model-00001-of-00001.bin")
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(ShardwiseError, match="never pickled .bin files"):
        CheckpointSource(root)
    root = _malicious_checkpoint(tmp_path / "renamed", marker, "model.safetensors")  # a pickle in disguise
    with pytest.raises(ShardwiseError, match="not a safetensors file"):
        CheckpointSource(root)
    assert not marker.exists()
