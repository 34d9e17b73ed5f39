"""Broken and hostile input through the command line: one clear line, a non-zero exit, never a traceback.

Covers the documents shardwise reads (config.json, plans, partition configs), a config that disagrees
with its weights, and failures that are ours rather than the user's (a bug or a dead rank).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_cli import assert_one_line_error, shardwise

from shardwise.config import config_from_dict, load_config
from shardwise.conformance import conform
from shardwise.errors import ShardwiseError
from shardwise.families import state_dict_shapes


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("content,pattern", [
    (b"[1, 2, 3]", "a model config is a JSON object, got list"),
    (b'{"architectures": ["LlamaForCausalLM"], "hidden_size": ', "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_malformed_config_json(tmp_path, content, pattern):
    (tmp_path / "config.json").write_bytes(content)
    assert_one_line_error(shardwise("plan", "--model-path", str(tmp_path)), pattern)


@pytest.mark.parametrize("field,value,pattern", [
    ("hidden_size", "576", "hidden_size must be an integer"),
    ("num_attention_heads", 0, "num_attention_heads must be an integer of at least 1"),
    ("num_key_value_heads", -3, "num_key_value_heads must be an integer"),
    ("vocab_size", 1.5, "vocab_size must be an integer"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number"),
    ("eos_token_id", ["x"], "eos_token_id must be a non-negative integer"),
    ("architectures", "LlamaForCausalLM", "architectures must be a list"),
    ("rope_scaling", [1], "must be JSON objects"),
])
def test_config_fields_of_the_wrong_type(tiny_raw, field, value, pattern):
    with pytest.raises(ShardwiseError, match=pattern):
        config_from_dict({**tiny_raw, field: value})


def test_config_error_names_the_file(tmp_path, tiny_raw):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_raw, "hidden_size": True}))
    with pytest.raises(ShardwiseError, match=r"config\.json: hidden_size must be an integer"):
        load_config(tmp_path)


def test_config_disagreeing_with_weights_is_refused_before_any_rank_starts(tmp_path, tiny_models):
    model = _copy(tiny_models["llama3_rope"], tmp_path / "m")
    _edit_config(model, intermediate_size=96)  # the weights were saved with 100
    proc = shardwise("run", "--model-path", str(model), "--tp-degree", "2", "--max-new-tokens", "2",
                     "--no-chat-template", "--prompt", "hi")
    assert_one_line_error(proc, "config.json implies shape [96, 64] (intermediate_size 96, hidden_size 64) but")
    assert "holds [100, 64] in model-" in proc.stderr
    assert "Sharding weights" not in proc.stderr  # refused by the parent: no rank was started


def test_header_shape_disagreeing_with_config_names_the_tensor(tiny_raw):
    config = config_from_dict(tiny_raw)
    found = state_dict_shapes(config, "F32")
    found["model.layers.1.self_attn.k_proj.weight"] = ((16, 72), "F32")
    with pytest.raises(ShardwiseError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: config\.json implies "
                                             r"shape \[24, 72\] \(num_key_value_heads 3 x head_dim 8"):
        conform(found, config)


def test_missing_tensor_is_named(tiny_raw):
    config = config_from_dict(tiny_raw)
    found = state_dict_shapes(config, "F32")
    del found["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(ShardwiseError, match=r"lacks 1 tensor\(s\).*model\.layers\.0\.mlp\.down_proj\.weight"):
        conform(found, config)


def test_unused_tensors_are_named_and_left_out(tiny_raw, caplog):
    config = config_from_dict(tiny_raw)
    found = {**state_dict_shapes(config, "F32"), "model.layers.0.self_attn.rotary_emb.inv_freq": ((4,), "F32"),
             "lm_head.weight": ((101, 72), "F32")}  # tied, yet stored: kept, since its shape is right
    with caplog.at_level("WARNING", logger="shardwise"):
        used = conform(found, config)
    assert "rotary_emb.inv_freq" not in "".join(used) and "lm_head.weight" in used
    assert "1 tensor(s) in the checkpoint are not used" in caplog.text and "rotary_emb.inv_freq" in caplog.text


@pytest.mark.parametrize("content,pattern", [
    ("sharding: [", "not valid YAML"),
    ("- just\n- a list\n", "a sharding plan is a YAML mapping"),
    ("sharding:\n  lm_head.weight: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_malformed_plan(tmp_path, tiny_models, content, pattern):
    plan = tmp_path / "plan.yaml"
    plan.write_text(content)
    proc = shardwise("plan", "--model-path", str(tiny_models["gqa9_tied"]), "--sharding-config", str(plan))
    assert_one_line_error(proc, pattern)


def test_plan_that_is_a_directory(tmp_path, tiny_models):
    proc = shardwise("plan", "--model-path", str(tiny_models["gqa9_tied"]), "--sharding-config", str(tmp_path))
    assert_one_line_error(proc, "is a directory")


@pytest.mark.parametrize("content,pattern", [(b"{", "not valid JSON"), (b"\xc3\x28", "not UTF-8"),
                                             (b"[]", "partition")])
def test_malformed_partition_config(tmp_path, tiny_models, content, pattern):
    path = tmp_path / "partitions.json"
    path.write_bytes(content)
    proc = shardwise("plan", "--model-path", str(tiny_models["gqa9_tied"]), "--partition-config", str(path))
    assert_one_line_error(proc, pattern)


# Failures that are not the user's: a bug inside a rank, a rank killed by the system. The script patches
# the rank's loader; spawned ranks re-import it as their main module, so the patch reaches them too.
_INJECT = """
import os, signal, sys, time
import shardwise.runner as runner

def broken(*args, **kwargs):
    if {kill}:  # rank 1 is killed; rank 0 waits, to be stopped by the parent (load_sharded(source, dtype, plan, comm))
        if args[3].rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    raise TypeError("injected bug")

runner.load_sharded = broken
if __name__ == "__main__":
    from shardwise.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _run_injected(tmp_path, model, kill: bool, *extra):
    script = tmp_path / "inject.py"
    script.write_text(textwrap.dedent(_INJECT.format(kill=kill)))
    return subprocess.run([sys.executable, str(script), "run", "--model-path", str(model), "--tp-degree", "2",
                           "--max-new-tokens", "2", "--no-chat-template", "--prompt", "w3 w4", *extra],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow
def test_bug_inside_a_rank_is_one_line_with_exit_code_1(tmp_path, tiny_model_dir):
    proc = _run_injected(tmp_path, tiny_model_dir, kill=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shardwise: error: rank ") and "internal error: TypeError: injected bug" in last
    assert "--debug shows the traceback" in last and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_debug_shows_the_rank_traceback(tmp_path, tiny_model_dir):
    proc = _run_injected(tmp_path, tiny_model_dir, False, "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and 'raise TypeError("injected bug")' in proc.stderr


@pytest.mark.slow
def test_killed_rank_is_the_last_line(tmp_path, tiny_model_dir):
    """No library warning (resource_tracker's leaked semaphores) comes after the report."""
    proc = _run_injected(tmp_path, tiny_model_dir, kill=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "shardwise: error: rank 1 died (signal SIGKILL); the other ranks were stopped", proc.stderr


def test_bug_in_the_parent_is_one_line(tmp_path, monkeypatch, capsys):
    from shardwise import cli

    def broken(args):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(cli, "_cmd_plan", broken)
    assert cli.main(["plan", "--model-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shardwise: internal error: ZeroDivisionError: injected (a bug in shardwise; --debug shows the "
                   "traceback)"]
    with pytest.raises(ZeroDivisionError):
        cli.main(["plan", "--model-path", str(tmp_path), "--debug"])


@pytest.mark.slow
def test_presharded_checkpoint_knows_its_own_shape(tmp_path, tiny_model_dir):
    """--skip-sharding without --tp-degree runs at the TP degree the files were made for; a different one
    without --reshard is refused, naming both."""
    compiled = tmp_path / "compiled"
    proc = shardwise("shard", "--model-path", str(tiny_model_dir), "--compiled-model-path", str(compiled),
                     "--tp-degree", "3")
    assert proc.returncode == 0, proc.stderr
    common = ("run", "--compiled-model-path", str(compiled), "--skip-sharding", "--max-new-tokens", "3",
              "--no-chat-template", "--prompt", "w3 w4 w5")
    ran = shardwise(*common)
    assert ran.returncode == 0, ran.stderr
    assert "mesh tensor=3" in ran.stderr and "Output:" in ran.stdout
    resliced = shardwise(*common, "--reshard")  # nothing to re-slice: still the files' own TP 3
    assert resliced.returncode == 0 and "mesh tensor=3" in resliced.stderr, resliced.stderr
    assert_one_line_error(shardwise(*common, "--tp-degree", "2"),
                          "the TP degree changed (files are for tensor 3, asked for tensor 2)")


def test_shard_into_a_regular_file_is_one_line(tmp_path, tiny_models):
    target = tmp_path / "not-a-dir"
    target.write_text("precious")
    proc = shardwise("shard", "--model-path", str(tiny_models["gqa9_tied"]), "--compiled-model-path", str(target))
    assert_one_line_error(proc, "not a directory")
    assert target.read_text() == "precious"


def test_bad_environment_setting_is_one_line(tiny_models):
    import os

    env_proc = subprocess.run([sys.executable, "-m", "shardwise", "plan", "--model-path",
                               str(tiny_models["gqa9_tied"])], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SHARDWISE_MAP_WEIGHTS": "maybe", "HF_HUB_OFFLINE": "1"})
    # `plan` maps nothing, so the setting is not read; `run` reads it and says what is wrong with it.
    assert env_proc.returncode == 0, env_proc.stderr
    run_proc = subprocess.run([sys.executable, "-m", "shardwise", "run", "--model-path",
                               str(tiny_models["gqa9_tied"]), "--max-new-tokens", "1"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "SHARDWISE_MAP_WEIGHTS": "maybe", "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(run_proc, "SHARDWISE_MAP_WEIGHTS='maybe'")
