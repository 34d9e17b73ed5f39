"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def shardwise(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("shardwise: error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_directory(tmp_path):
    assert_one_line_error(shardwise("run", "--model-path", str(tmp_path / "nope")), "does not exist")


def test_not_an_hf_directory(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    assert_one_line_error(shardwise("run", "--model-path", str(tmp_path)), "no config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(shardwise("run", "--model-path", str(tmp_path)), "unsupported architecture 'GPT2LMHeadModel'")


def test_config_without_weights(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text((tiny_models["gqa9_tied"] / "config.json").read_text())
    assert_one_line_error(shardwise("run", "--model-path", str(tmp_path)), "no safetensors weights")


@pytest.mark.parametrize("tp,message", [("0", "at least 1"), ("16", "exceeds the model's 9 attention heads")])
def test_impossible_tp_degree(tiny_models, tp, message):
    assert_one_line_error(shardwise("run", "--model-path", str(tiny_models["gqa9_tied"]), "--tp-degree", tp), message)


def test_prompt_longer_than_context(smollm2):
    proc = shardwise("run", "--model-path", str(smollm2), "--max-context-length", "8", "--prompt", "hello " * 20)
    assert_one_line_error(proc, "longer than --max-context-length 8")


def test_help_explains_the_flags():
    out = shardwise("run", "--help").stdout
    for flag in ("--model-path", "--tp-degree", "--torch-dtype", "--check-accuracy-mode", "--benchmark", "--seq-len"):
        assert flag in out


def test_serve_takes_the_nxd_flags_its_engine_honours_and_refuses_the_others():
    from shardwise.cli import build_parser
    from shardwise.nxd_flags import nxd_options

    args = build_parser().parse_args(["serve", "--fused-qkv", "--mlp_kernel_enabled"])
    assert nxd_options(args) == {"fused_qkv": True, "fused_gate_up": True}
    # The engine has no on-device sampling: the flag is refused rather than accepted and ignored.
    proc = shardwise("serve", "--on-device-sampling")
    assert proc.returncode == 2 and "unrecognized arguments: --on-device-sampling" in proc.stderr
