"""The main job, as NxD's ``inference_demo run``: load sharded, generate, optionally check and time.

The parent process validates input and tokenizes (so bad input fails before any rank starts), then
launches the ranks; rank 0 writes what it produced to a results file the parent reads back.
"""

from __future__ import annotations

import json
import logging
import os
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
from .parallel import devices as dev
from .parallel.comm import Collectives
from .parallel.launch import default_backend, launch, threads_per_rank, under_torchrun
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
    draft_model_path: str | None = None  # NxD's speculative decoding: the draft checkpoint
    speculation_length: int | None = None  # tokens proposed per round; None: 4 when speculating, 0: off
    speculation_type: str | None = None  # "draft" (default with a draft path) or "ngram" (prompt lookup)
    draft_model_tp_degree: int | None = None  # None or the target's degree: sharded; 1: replicated per rank
    on_device_sampling: bool = False  # NxD's --on-device-sampling: reduce each vocabulary shard before gathering
    fused_qkv: bool = False  # NxD's --fused-qkv / --qkv-kernel-enabled: one q/k/v matmul per rank
    fused_gate_up: bool = False  # NxD's --mlp-kernel-enabled: one gate/up matmul per rank
    enable_bucketing: bool = False  # NxD's --enable-bucketing: prefill and decode on static shapes (decode_buckets.py)
    context_encoding_buckets: list[int] | None = None  # prompt lengths; default powers of 2 to max_context_length
    token_generation_buckets: list[int] | None = None  # KV-cache lengths; default powers of 2 to seq_len
    compile_decode: bool = False  # --compile-decode: torch.compile the decode step per bucket (implies bucketing)

    def decode_buckets(self):
        """The decoder buckets these options ask for, or None without --enable-bucketing (or --compile-decode)."""
        if not (self.enable_bucketing or self.compile_decode):
            return None
        from .decode_buckets import DecodeBuckets

        return DecodeBuckets.resolve(self.context_encoding_buckets, self.token_generation_buckets,
                                     self.max_context_length, self.seq_len)


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
    speculation: dict | None = None  # acceptance rate, tokens per target forward, speed-up (with --benchmark)
    rows_per_rank: list[int] | None = None  # a batch divided among replicas: the real rows each rank generated
    outputs: object = None  # encoder tasks: encoders.EncoderOutput (embeddings, class scores, mask predictions)
    partitions: dict[str, RunResult] = field(default_factory=dict)  # several partitions: each one's job


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s shardwise: %(message)s", force=True)


def _rank_main(rank: int, world: int, opts: RunOptions, batches: list[list[list[int]]], pad_id: int,
               eos: tuple[int, ...], result_path: str, devices: tuple[str, ...] | None = None,
               forced_targets: list[list[list[int]]] | None = None) -> None:
    _setup_logging()
    if rank != 0:
        logging.getLogger("shardwise").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    device = dev.bound_device() or (devices[rank] if devices else opts.device)  # bound by launch
    sharded, comm = load_rank_model(opts, rank, device)
    shard_s, load_s = comm.max_over_ranks([sharded.stats.seconds, time.perf_counter() - t0])
    log.info("Done sharding weights in %.3f seconds", shard_s)
    log.info("Total model loading time: %.3f seconds", load_s)
    sampling = Sampling(opts.top_k, opts.top_p, opts.temperature, opts.seed)
    keep_logits = opts.check_accuracy_mode != "skip-accuracy-check"  # token matching reports margins
    speculation = speculation_of(opts)
    draft = load_draft(opts, comm, device) if speculation and speculation.kind == "draft" else None
    spec_stats = None

    buckets = opts.decode_buckets()
    if buckets is not None and speculation is not None:
        log.info("--enable-bucketing and --compile-decode apply to plain decoding; speculation runs eagerly at the "
                 "prompts' own lengths")
    compiled = None
    if opts.compile_decode:
        from .compiled_decode import CompiledDecode

        compiled = CompiledDecode(sharded.module, device)

    def one(batch: list[list[int]], new_tokens: int, keep: bool) -> Generated:
        if sharded.batch_split is not None:  # the plan divides the batch among replicas (parallel/data.py)
            from .parallel.data import generate_split

            return generate_split(sharded.batch_split, sharded.module, batch, new_tokens, pad_id, eos, sampling,
                                  keep, device, buckets, opts.on_device_sampling, compiled)
        return generate(sharded.module, batch, new_tokens, pad_id, eos, sampling, comm, keep, device,
                        buckets=buckets, on_device_sampling=opts.on_device_sampling, compiled=compiled)

    def plain() -> list[Generated]:
        return [one(b, opts.max_new_tokens, keep_logits) for b in batches]

    def run_all() -> list[Generated]:
        nonlocal spec_stats
        if speculation is None:
            return plain()
        from .speculative import SpeculationStats, speculative_generate

        spec_stats, out = SpeculationStats(), []
        for b in batches:
            g, stats = speculative_generate(sharded.module, b, opts.max_new_tokens, pad_id, eos, speculation,
                                            sampling, comm, draft.module if draft else None, device)
            spec_stats.add(stats)
            out.append(g)
        return out

    runs = 1
    if opts.benchmark:
        one(batches[0], min(4, opts.max_new_tokens), False)  # warm-up (with --compile-decode: the first bucket's graph)
        runs = max(1, opts.benchmark_iterations)
    waited_before = comm.waited
    timings = [run_all() for _ in range(runs)]
    results = timings[-1]
    collective_wait = _collective_wait(comm, waited_before, timings)
    prefill = statistics.median(sum(g.prompt_tokens for g in t) / max(1e-9, sum(g.prefill_seconds for g in t))
                                for t in timings)
    decode = statistics.median(_decode_rate(t, speculation is not None) for t in timings)
    speculation_report = None
    if speculation is not None:
        speculation_report = {
            "type": speculation.kind, "length": speculation.length,
            "draft_tp_degree": (draft.comm.world_size if draft else None),
            "acceptance_rate": spec_stats.acceptance_rate,
            "tokens_per_target_forward": spec_stats.tokens_per_target_forward,
            "rounds": spec_stats.rounds, "draft_forwards": spec_stats.draft_forwards,
        }
        if opts.benchmark:  # the same run without speculation, for the speed-up
            without = statistics.median(_decode_rate(plain(), True) for _ in range(runs))
            speculation_report["decode_tokens_per_second_without"] = without
            speculation_report["speedup"] = decode / max(1e-9, without)
        log.info("Speculation (%s, K=%d): acceptance %.1f%%, %.2f tokens per target forward%s",
                 speculation.kind, speculation.length, 100 * spec_stats.acceptance_rate,
                 spec_stats.tokens_per_target_forward,
                 f", {speculation_report['speedup']:.2f}x decode tokens/s" if opts.benchmark else "")
    forced = None
    if forced_targets is not None:  # teacher-forced logit matching: HF's tokens fed at every position
        from .accuracy import forced_logits

        forced = [forced_logits(sharded.module, b, t, pad_id, device) for b, t in zip(batches, forced_targets)]
    if rank == 0 and compiled is not None and compiled.simulated:
        log.info("Compiled decode: the decode steps ran eagerly on the simulated GPUs (torch.compile cannot trace "
                 "their tensors); on real GPUs they run as CUDA graphs")
    elif rank == 0 and compiled is not None:
        log.info("Compiled decode: %d graph(s) (batch, KV slots: %s) in %.1f s%s", len(compiled.shapes),
                 ", ".join(f"{b}x{k}" for b, k in sorted(compiled.shapes)), compiled.compile_seconds,
                 f", {compiled.cached} from inductor's cache" if compiled.cached else "")
    if rank == 0 and opts.on_device_sampling:
        log.info("On-device sampling: %d bytes gathered per step to choose the tokens",
                 max(g.sampling_bytes_per_step for g in results))
    if rank == 0:
        torch.save({
            "tokens": [g.tokens for g in results],
            "logits": [g.step_logits for g in results], "forced_logits": forced,
            "load_seconds": load_s, "shard_seconds": shard_s,
            "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode,
            "threads_per_rank": torch.get_num_threads(),
            "compile_seconds": compiled.compile_seconds if compiled is not None else None,
            "sampling_bytes_per_step": max(g.sampling_bytes_per_step for g in results),
            "bytes_held_rank0": sharded.stats.bytes_held, "bytes_read_rank0": sharded.stats.bytes_read,
            "speculation": speculation_report,
            "rows_per_rank": _rows_per_rank(results),
            "collective_wait": collective_wait,
        }, result_path)


def _collective_wait(comm: Collectives, waited_before: float | None, timings: list[list[Generated]]) -> dict | None:
    """Each rank's seconds waiting for its peers at shared-memory collectives over the timed generations, and
    that as a share of their prefill + decode time: how unevenly the ranks ran (a collective; every rank
    calls it). None on one rank or over torch.distributed."""
    if comm.world_size == 1 or comm.waited is None or waited_before is None:
        return None
    busy = sum(g.prefill_seconds + g.decode_seconds for t in timings for g in t)
    mine = torch.tensor([[comm.waited - waited_before, busy]], dtype=torch.float64)
    rows = comm.host_all_gather(mine, dim=0).tolist()
    seconds = [w for w, _ in rows]
    shares = [w / max(b, 1e-9) for w, b in rows]
    if comm.rank == 0:
        log.info("Ranks waited for each other at collectives: %s of generation time (by rank)",
                 " / ".join(f"{s:.0%}" for s in shares))
    return {"seconds_per_rank": seconds, "share_of_generation_per_rank": shares}


def _rows_per_rank(generated: list[Generated]) -> list[int] | None:
    """Real rows each rank generated over all batches, when the plan divides batches among replicas."""
    if any(g.rows_per_rank is None for g in generated):
        return None
    return [sum(rows) for rows in zip(*(g.rows_per_rank for g in generated))]


def _decode_rate(generated: list[Generated], by_tokens: bool) -> float:
    """Decode tokens/s: rows x steps for plain decoding (as every step computes every row), or the
    tokens after each row's first (speculation's steps emit several; compared against plain decoding
    measured the same way)."""
    seconds = max(1e-9, sum(g.decode_seconds for g in generated))
    if by_tokens:
        return sum(max(0, len(row) - 1) for g in generated for row in g.tokens) / seconds
    return sum(len(g.tokens) * g.decode_steps for g in generated) / seconds


def speculation_of(opts: RunOptions):
    """The run's ``speculative.Speculation``, or None: checked options, NxD's names."""
    from .speculative import DRAFT, NGRAM, Speculation

    if opts.speculation_length == 0:
        return None
    kind = opts.speculation_type or (DRAFT if opts.draft_model_path else None)
    if kind is None:
        if opts.speculation_length is not None or opts.draft_model_tp_degree is not None:
            raise ShardwiseError("--speculation-length and --draft-model-tp-degree need --draft-model-path or "
                                 "--speculation-type ngram")
        return None
    if kind == DRAFT and not opts.draft_model_path:
        raise ShardwiseError("--speculation-type draft needs --draft-model-path")
    if kind == NGRAM and opts.draft_model_path:
        raise ShardwiseError("--speculation-type ngram uses no draft model: drop --draft-model-path")
    return Speculation(kind, opts.speculation_length or 4)


def load_draft(opts: RunOptions, comm: Collectives, device: str) -> ShardedModel:
    """The draft model on this rank: sharded over the target's ranks, or whole on each (TP 1)."""
    if (opts.draft_model_tp_degree or comm.world_size) == comm.world_size:
        return load_sharded(opts.draft_model_path, opts.torch_dtype, None, comm, device)
    alone = comm.subgroup([[r] for r in range(comm.world_size)])  # every rank its own group of one
    return load_sharded(opts.draft_model_path, opts.torch_dtype, None, alone, device)


def load_rank_model(opts: RunOptions, rank: int, device: str) -> tuple[ShardedModel, Collectives]:
    """Inside a rank: this rank's part of the model the options describe, loaded the way they say
    (shard on load, or pre-sharded files), once every rank has loaded. ``device`` is the rank's bound
    device (``devices.bind_device`` ran before its process group was created)."""
    comm = Collectives()
    plan = run_plan(opts, load_config(opts.model_path))
    weights = "presharded" if opts.skip_sharding or opts.save_sharded_checkpoint else "auto"
    source = opts.model_path if Path(opts.model_path) != Path(opts.compiled_model_path or "") else None
    sharded = load_sharded(source, opts.torch_dtype, plan, comm, device, progress=opts.progress and rank == 0,
                           compiled_model_path=opts.compiled_model_path, weights=weights, reshard=opts.reshard,
                           verify=opts.verify, fused_qkv=opts.fused_qkv, fused_gate_up=opts.fused_gate_up)
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
    if topology is None:  # e.g. --device cuda:1 cannot serve several local ranks
        dev.rank_device(opts.device, opts.start_rank_id, opts.start_rank_id, None,
                        opts.local_ranks_size or mesh.world_size - opts.start_rank_id)
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
    speculation = speculation_of(opts)
    if speculation is not None:
        if opts.check_accuracy_mode == "logit-matching":
            raise ShardwiseError("logit matching checks plain decoding; with speculation use token-matching")
        if speculation.kind == "draft":
            _check_draft(opts, config, mesh.world_size)
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
    if opts.context_encoding_buckets or opts.token_generation_buckets:
        if not (opts.enable_bucketing or opts.compile_decode):
            raise ShardwiseError("--context-encoding-buckets and --token-generation-buckets need --enable-bucketing "
                                 "(or --compile-decode)")
    buckets = opts.decode_buckets()
    if buckets is not None:
        room = min(buckets.room(max(len(p) for p in b)) for b in batches)
        opts = replace(opts, max_new_tokens=min(opts.max_new_tokens, room))
        if opts.max_new_tokens < 1:
            raise ShardwiseError(f"the token-generation buckets (largest {buckets.kv[-1]}) leave no room to generate "
                                 "after the prompt's context-encoding bucket")
    return opts, config, tokenizer, batches


def _check_draft(opts: RunOptions, config, world: int) -> None:
    """The draft must be a decoder over the target's vocabulary, laid out for its TP degree, with the
    target's tokenizer (the same ids mean the same text), all checked before a rank starts."""
    from .checkpoint import CheckpointSource
    from .prompts import load_tokenizer

    draft_tp = opts.draft_model_tp_degree or world
    if draft_tp not in (1, world):
        raise ShardwiseError(f"--draft-model-tp-degree must be 1 (replicated) or the target's {world}, not {draft_tp}")
    draft_config = load_config(opts.draft_model_path)
    if resolve_task(draft_config, None, None) != CAUSAL_LM:
        raise ShardwiseError(f"the draft {opts.draft_model_path} is not a causal language model")
    if draft_config.vocab_size != config.vocab_size:
        raise ShardwiseError(f"the draft's vocabulary has {draft_config.vocab_size} tokens, the target's "
                             f"{config.vocab_size}: speculation needs one tokenizer")
    if load_tokenizer(opts.draft_model_path).get_vocab() != load_tokenizer(opts.model_path).get_vocab():
        raise ShardwiseError("the draft's tokenizer is not the target's: speculation needs one tokenizer")
    draft_plan = resolve_plan(draft_config.family)
    check_runtime(model_layout(opts.draft_model_path, plan=draft_plan, config=draft_config,
                               source=CheckpointSource(opts.draft_model_path), mesh=draft_plan.mesh(draft_tp)))


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
    reference = None
    # Under torchrun every rank runs this; only rank 0 compares, but logit matching feeds HF's tokens to all.
    compares = not under_torchrun() or int(os.environ.get("RANK", "0")) == 0
    if opts.check_accuracy_mode == "logit-matching" or (opts.check_accuracy_mode != "skip-accuracy-check"
                                                        and compares):
        from .accuracy import hf_reference

        if not Sampling(opts.top_k, opts.top_p, opts.temperature).greedy:
            raise ShardwiseError("accuracy checks compare greedy output: use --top-k 1")
        # First, so that logit matching can feed HF's tokens to the ranks (teacher forcing); the HF
        # model is freed before any rank loads.
        log.info("Running HF transformers on one process for the accuracy check (%s)", opts.check_accuracy_mode)
        reference = hf_reference(opts.model_path, batches, opts.max_new_tokens, pad_id, eos, dtype)
    forced_targets = [tokens for tokens, _ in reference] if opts.check_accuracy_mode == "logit-matching" else None
    local = opts.local_ranks_size or world - opts.start_rank_id
    local_threads = topology.threads[opts.start_rank_id:opts.start_rank_id + local] if topology else None
    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        result_path = str(Path(tmp) / "rank0.pt")
        launch(_rank_main, world, (opts, batches, pad_id, eos, result_path, devices, forced_targets),
               default_backend(opts.device), opts.start_rank_id, opts.local_ranks_size, threads=local_threads,
               device=opts.device, devices=devices)
        if not Path(result_path).exists():  # a rank other than 0 under torchrun: rank 0 reports
            return RunResult([], [], 0, 0, 0, 0)
        data = torch.load(result_path)
    tokens = [row for batch in data["tokens"] for row in batch]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    for prompt, text in zip(opts.prompts, texts):
        print(f"\nPrompt: {prompt}\nOutput: {text}", flush=True)
    result = RunResult(texts, tokens, data["load_seconds"], data["shard_seconds"],
                       data["prefill_tokens_per_second"], data["decode_tokens_per_second"],
                       speculation=data.get("speculation"), rows_per_rank=data.get("rows_per_rank"))
    log.info("Prefill %.1f tokens/s, decode %.1f tokens/s", result.prefill_tokens_per_second,
             result.decode_tokens_per_second)
    if reference is not None:
        from .accuracy import compare

        log.info("Checking accuracy (%s) against HF transformers on one process", opts.check_accuracy_mode)
        report = compare(opts.check_accuracy_mode, list(zip(data["tokens"], data["logits"])), reference, dtype,
                         data["forced_logits"])
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
            "sampling_bytes_per_step": data["sampling_bytes_per_step"],
            "compile_seconds": data.get("compile_seconds"),
            "new_tokens": [len(t) for t in tokens], "speculation": data.get("speculation"),
            "rows_per_rank": data.get("rows_per_rank"),
            "collective_wait": data.get("collective_wait"),
            "options": asdict(opts),
        }
        path = out_dir / "benchmark_report.json"
        tmp_path = path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(report, indent=2))
        tmp_path.replace(path)
        result.report_path = str(path)
        log.info("Benchmark report written to %s", path)
    return result
