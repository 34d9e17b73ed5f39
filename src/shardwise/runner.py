"""The main job, as NxD's ``inference_demo run``: load sharded, generate, optionally check and time.

The parent process validates input and tokenizes (so bad input fails before any rank starts), then
launches the ranks; rank 0 writes what it produced to a results file the parent reads back.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import settings
from .config import load_config
from .conformance import model_layout
from .dtypes import name_of, resolve_dtype
from .errors import ShardwiseError
from .generation import Generated, Sampling, generate
from .mesh import Mesh
from .parallel.comm import Collectives
from .parallel.launch import default_backend, launch, threads_per_rank
from .parallelize import check_runtime
from .plan import TENSOR_AXIS, Plan, resolve_plan
from .sharded_model import ShardedModel, load_sharded
from .tasks import CAUSAL_LM, resolve_task
from .topology import Topology, load_partition_config, resolve_topology

log = logging.getLogger("shardwise")
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass
class RunOptions:
    model_path: str
    tp_degree: int | None = None  # None: the partition's device count, the plan's mesh sizes, or 2
    torch_dtype: str = "auto"
    batch_size: int = 1
    max_context_length: int = 1024
    seq_len: int = 2048
    max_new_tokens: int = 64
    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    pad_token_id: int | None = None
    prompts: list[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    chat_template: bool = True
    check_accuracy_mode: str = "skip-accuracy-check"
    benchmark: bool = False
    benchmark_iterations: int = 3
    output_dir: str = "."
    sharding_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str = "cpu"
    progress: bool = False
    partition_config: str | None = None  # device partition config JSON (see topology.py)
    partition: str | None = None  # which partition of it, when it has several
    sequence_parallel: bool = False  # NxD's --sequence-parallel-enabled: the family's sequence-parallel rules
    mesh: str | None = None  # --mesh fsdp=2,tensor=2: the plan's mesh (torchprime's ici_mesh overrides)
    compiled_model_path: str | None = None
    save_sharded_checkpoint: bool = False
    skip_sharding: bool = False
    reshard: bool = False
    verify: str = "auto"  # how a pre-sharded checkpoint's source is checked: auto, full or header
    start_rank_id: int = 0
    local_ranks_size: int | None = None
    task_type: str | None = None  # NxD's --task-type: causal-lm, embedding, ...; None: the checkpoint's default
    model_type: str | None = None  # NxD's --model-type: checked against the checkpoint when given


@dataclass
class RunResult:
    texts: list[str]
    tokens: list[list[int]]
    load_seconds: float
    shard_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    accuracy: str | None = None
    report_path: str | None = None
    task: str = "causal-lm"
    outputs: object = None  # encoder tasks: encoders.EncoderOutput (embeddings, class scores, mask predictions)
    partitions: dict[str, RunResult] = field(default_factory=dict)  # several partitions: each one's job


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s shardwise: %(message)s", force=True)


def _rank_main(rank: int, world: int, opts: RunOptions, batches: list[list[list[int]]], pad_id: int,
               eos: tuple[int, ...], result_path: str, devices: tuple[str, ...] | None = None) -> None:
    _setup_logging()
    if rank != 0:
        logging.getLogger("shardwise").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    device = devices[rank] if devices else opts.device
    sharded, comm = load_rank_model(opts, rank, device)
    shard_s, load_s = comm.max_over_ranks([sharded.stats.seconds, time.perf_counter() - t0])
    log.info("Done sharding weights in %.3f seconds", shard_s)
    log.info("Total model loading time: %.3f seconds", load_s)
    sampling = Sampling(opts.top_k, opts.top_p, opts.temperature, opts.seed)
    keep_logits = opts.check_accuracy_mode == "logit-matching"

    def run_all() -> list[Generated]:
        return [generate(sharded.module, b, opts.max_new_tokens, pad_id, eos, sampling, comm, keep_logits, device)
                for b in batches]

    runs = 1
    if opts.benchmark:
        generate(sharded.module, batches[0], min(4, opts.max_new_tokens), pad_id, eos, sampling, comm,
                 device=device)  # warm-up: first-call allocations and kernel selection
        runs = max(1, opts.benchmark_iterations)
    timings = [run_all() for _ in range(runs)]
    results = timings[-1]
    prefill = statistics.median(sum(g.prompt_tokens for g in t) / max(1e-9, sum(g.prefill_seconds for g in t))
                                for t in timings)
    decode = statistics.median(
        sum(len(g.tokens) * g.decode_steps for g in t) / max(1e-9, sum(g.decode_seconds for g in t)) for t in timings
    )
    if rank == 0:
        torch.save({
            "tokens": [g.tokens for g in results],
            "logits": [g.step_logits for g in results],
            "load_seconds": load_s, "shard_seconds": shard_s,
            "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode,
            "threads_per_rank": torch.get_num_threads(),
            "bytes_held_rank0": sharded.stats.bytes_held, "bytes_read_rank0": sharded.stats.bytes_read,
        }, result_path)


def load_rank_model(opts: RunOptions, rank: int, device: str) -> tuple[ShardedModel, Collectives]:
    """Inside a rank: this rank's part of the model the options describe, loaded the way they say
    (shard on load, or pre-sharded files), once every rank has loaded."""
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    comm = Collectives()
    plan = run_plan(opts, load_config(opts.model_path))
    weights = "presharded" if opts.skip_sharding or opts.save_sharded_checkpoint else "auto"
    source = opts.model_path if Path(opts.model_path) != Path(opts.compiled_model_path or "") else None
    sharded = load_sharded(source, opts.torch_dtype, plan, comm, device, progress=opts.progress and rank == 0,
                           compiled_model_path=opts.compiled_model_path, weights=weights, reshard=opts.reshard,
                           verify=opts.verify)
    comm.barrier()
    return sharded, comm


def run_plan(opts: RunOptions, config) -> Plan:
    """The sharding plan of a run: the user's (file, overrides, sequence parallelism) on the family's,
    or, loading pre-sharded files with none of those given, the plan the files were made with."""
    if opts.skip_sharding and not (opts.sharding_config or opts.overrides or opts.sequence_parallel):
        from .presharded import presharded_plan

        return presharded_plan(opts.compiled_model_path).with_mesh(opts.mesh)
    return resolve_plan(config.family, opts.sharding_config, opts.overrides, opts.sequence_parallel, opts.mesh)


def resolve_ranks(opts: RunOptions, config) -> tuple[Plan, Mesh, Topology | None]:
    """The plan, the mesh to run on and, with a partition config, the devices and threads of its ranks.

    A partition config decides the world size; the plan's mesh sizes or ``--tp-degree`` must agree
    with it. Without either, the plan's mesh sizes decide, else ``--tp-degree`` (default 2). A
    pre-sharded checkpoint loaded with ``--skip-sharding`` knows its own plan and TP degree: they are
    the defaults then.
    """
    topology = None
    if opts.partition_config:
        topology = resolve_topology(load_partition_config(opts.partition_config), opts.device, opts.partition)
    elif opts.partition:
        raise ShardwiseError("--partition needs --partition-config")
    plan = run_plan(opts, config)
    world = topology.world_size if topology else None
    tp = opts.tp_degree
    if tp is None and world is None and plan.mesh_sizes is None:
        if opts.skip_sharding:
            from .presharded import presharded_mesh

            tp = presharded_mesh(opts.compiled_model_path).size(TENSOR_AXIS)
        else:
            tp = 2
    return plan, plan.mesh(tp, world), topology


def validate(opts: RunOptions):
    """Everything that can be checked before starting a rank.

    Returns (options as the ranks get them, config, tokenizer, batches); ``opts`` itself is not changed.
    """
    from .prompts import encode_prompts, load_tokenizer

    settings.check_all()
    if opts.skip_sharding or opts.save_sharded_checkpoint:
        if not opts.compiled_model_path:
            raise ShardwiseError("--skip-sharding and --save-sharded-checkpoint need --compiled-model-path")
    if opts.skip_sharding and not Path(opts.model_path).exists():
        opts = replace(opts, model_path=opts.compiled_model_path)  # it carries config.json and the tokenizer
    config = load_config(opts.model_path)
    from .checkpoint import CheckpointSource

    plan, mesh, topology = resolve_ranks(opts, config)
    if topology is not None and topology.capped:
        log.info("Cores: %s", topology.capped)
    if not opts.skip_sharding:
        source = CheckpointSource(opts.model_path)  # raises if no weights
        # The whole layout, from headers alone: plan errors surface here, before any rank starts.
        check_runtime(model_layout(opts.model_path, plan=plan, config=config, source=source, mesh=mesh))
    resolve_dtype(opts.torch_dtype, config)
    resolve_task(config, opts.task_type, opts.model_type)
    if opts.check_accuracy_mode not in ("skip-accuracy-check", "token-matching", "logit-matching"):
        raise ShardwiseError(f"unknown --check-accuracy-mode {opts.check_accuracy_mode!r}")
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise ShardwiseError("--batch-size and --max-new-tokens must be at least 1")
    if not opts.prompts:
        raise ShardwiseError("no prompt given")
    if opts.benchmark and Path(opts.output_dir).exists() and not Path(opts.output_dir).is_dir():
        raise ShardwiseError(f"--output-dir {opts.output_dir!r} exists and is not a directory")
    if opts.skip_sharding:
        from .presharded import require_usable

        source = opts.model_path if Path(opts.model_path) != Path(opts.compiled_model_path) else None
        require_usable(opts.compiled_model_path, mesh.world_size, opts.torch_dtype, source, opts.reshard, plan,
                       opts.verify)
    tokenizer = load_tokenizer(opts.model_path)
    encoded = encode_prompts(tokenizer, opts.prompts, opts.chat_template)
    for text, ids in zip(opts.prompts, encoded):
        if len(ids) > opts.max_context_length:
            raise ShardwiseError(
                f"prompt {text[:40]!r}... is {len(ids)} tokens, "
                f"longer than --max-context-length {opts.max_context_length}"
            )
        if len(ids) >= opts.seq_len:
            raise ShardwiseError(f"prompt of {len(ids)} tokens leaves no room within --seq-len {opts.seq_len}")
    batches = [encoded[i:i + opts.batch_size] for i in range(0, len(encoded), opts.batch_size)]
    longest = max(len(p) for b in batches for p in b)
    opts = replace(opts, max_new_tokens=min(opts.max_new_tokens, opts.seq_len - longest))
    return opts, config, tokenizer, batches


def run(opts: RunOptions) -> RunResult:
    """Run the whole job; the Python equivalent of ``shardwise run``.

    A partition config with several partitions and no ``partition`` chosen runs one job per partition,
    one after the other (the SDK's multi-partition configs: each partition its own network); the result
    is the first job's, with every job's in ``partitions``.
    """
    _setup_logging()
    if opts.partition_config and opts.partition is None:
        names = [p.name for p in load_partition_config(opts.partition_config).partitions]
        if len(names) > 1:
            results: dict[str, RunResult] = {}
            for i, name in enumerate(names):
                log.info("Partition %r: job %d of %d", name, i + 1, len(names))
                results[name] = run(replace(opts, partition=name))
            first = results[names[0]]
            first.partitions = results
            return first
    opts, config, tokenizer, batches = validate(opts)
    task = resolve_task(config, opts.task_type, opts.model_type)
    if task != CAUSAL_LM:
        if opts.benchmark or opts.save_sharded_checkpoint:
            raise ShardwiseError(f"--benchmark and --save-sharded-checkpoint are for generation; {task} runs time "
                                 "themselves (see bench/encoder.py) and pre-shard with `shardwise shard`")
        from .encoders import run_encoder

        return run_encoder(opts, config, tokenizer, batches, task)
    pad_id = opts.pad_token_id
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    eos = tuple(config.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    dtype = resolve_dtype(opts.torch_dtype, config)
    plan, mesh, topology = resolve_ranks(opts, config)
    world = mesh.world_size
    threads = topology.threads if topology else (threads_per_rank(world),) * world
    where = (f"partition {topology.partition.name!r} ({topology.kind}, {topology.link} links)" if topology
             else f"mesh {mesh.describe()}")
    log.info("Model %s: %d layers, %d heads (%d KV), vocab %d; %s, %s, threads per rank %s",
             config.architecture, config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size,
             where, name_of(dtype), ",".join(map(str, threads)))
    if opts.save_sharded_checkpoint:
        from .presharded import preshard

        log.info("Pre-sharding weights to %s", Path(opts.compiled_model_path) / "weights")
        stats = preshard(opts.model_path, opts.compiled_model_path, world, opts.torch_dtype, plan,
                         opts.start_rank_id, opts.local_ranks_size, verify="full" if opts.verify == "full" else "auto")
        log.info("Done pre-sharding ranks %s in %.3f seconds (kept %s)", stats.ranks_written or "none",
                 stats.seconds, stats.ranks_skipped or "none")
    devices = topology.devices if topology else None
    local = opts.local_ranks_size or world - opts.start_rank_id
    local_threads = topology.threads[opts.start_rank_id:opts.start_rank_id + local] if topology else None
    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        result_path = str(Path(tmp) / "rank0.pt")
        launch(_rank_main, world, (opts, batches, pad_id, eos, result_path, devices),
               default_backend(opts.device), opts.start_rank_id, opts.local_ranks_size, threads=local_threads)
        if not Path(result_path).exists():  # a rank other than 0 under torchrun: rank 0 reports
            return RunResult([], [], 0, 0, 0, 0)
        data = torch.load(result_path)
    tokens = [row for batch in data["tokens"] for row in batch]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    for prompt, text in zip(opts.prompts, texts):
        print(f"\nPrompt: {prompt}\nOutput: {text}", flush=True)
    result = RunResult(texts, tokens, data["load_seconds"], data["shard_seconds"],
                       data["prefill_tokens_per_second"], data["decode_tokens_per_second"])
    log.info("Prefill %.1f tokens/s, decode %.1f tokens/s", result.prefill_tokens_per_second,
             result.decode_tokens_per_second)
    if opts.check_accuracy_mode != "skip-accuracy-check":
        from .accuracy import compare, hf_reference

        log.info("Checking accuracy (%s) against HF transformers on one process", opts.check_accuracy_mode)
        if not Sampling(opts.top_k, opts.top_p, opts.temperature).greedy:
            raise ShardwiseError("accuracy checks compare greedy output: use --top-k 1")
        reference = hf_reference(opts.model_path, batches, opts.max_new_tokens, pad_id, eos, dtype)
        report = compare(opts.check_accuracy_mode, list(zip(data["tokens"], data["logits"])), reference, dtype)
        result.accuracy = report.detail
        if not report.passed:
            raise ShardwiseError(f"accuracy check ({report.mode}) failed: {report.detail}")
        log.info("Accuracy check (%s) passed: %s", report.mode, report.detail)
    if opts.benchmark:
        out_dir = Path(opts.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "model": str(opts.model_path), "architecture": config.architecture, "tp_degree": world,
            "torch_dtype": name_of(dtype), "batch_size": opts.batch_size,
            "threads_per_rank": data["threads_per_rank"], "iterations": opts.benchmark_iterations,
            "load_seconds": data["load_seconds"], "shard_seconds": data["shard_seconds"],
            "prefill_tokens_per_second": data["prefill_tokens_per_second"],
            "decode_tokens_per_second": data["decode_tokens_per_second"],
            "new_tokens": [len(t) for t in tokens], "options": asdict(opts),
        }
        path = out_dir / "benchmark_report.json"
        tmp_path = path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(report, indent=2))
        tmp_path.replace(path)
        result.report_path = str(path)
        log.info("Benchmark report written to %s", path)
    return result
