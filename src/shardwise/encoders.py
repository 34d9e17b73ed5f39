"""Encoder runs (``--task-type embedding | sequence-classification | masked-lm``): one forward per batch.

The parent validates and tokenizes as for generation; every rank runs the sharded encoder over each
right-padded batch, and rank 0 turns the output into what the task asks for. The same reduction runs
on HF transformers' output for ``--check-accuracy-mode``, so the comparison is like for like.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ShardwiseError
from .tasks import CLASSIFICATION, EMBEDDING

log = logging.getLogger("shardwise")
COSINE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class EncoderOutput:
    """Per prompt: the embedding (``embedding``), the class probabilities (``sequence-classification``) or
    the top-3 (token id, probability) at each mask (``masked-lm``)."""

    task: str
    values: list  # one entry per prompt


def pad_batch(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, :len(p)] = torch.tensor(p)
        mask[i, :len(p)] = 1
    return ids, mask


def reduce_output(task: str, out: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, mask_token: int | None):
    """The task's result from a batch's model output (ours or HF's: the same code for both)."""
    out = out.float()
    if task == EMBEDDING:
        m = mask[..., None].to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return list(F.normalize(pooled, p=2, dim=-1))
    if task == CLASSIFICATION:
        return list(out.softmax(-1))
    results = []
    for row_ids, row in zip(ids, out):
        where = (row_ids == mask_token).nonzero().flatten().tolist() if mask_token is not None else []
        results.append([[(int(t), float(p)) for p, t in zip(*row[i].softmax(-1).topk(3))] for i in where])
    return results


def forward(model, task: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The output a task reduces: the encoder's hidden states for embeddings, else the head's logits."""
    if task == EMBEDDING and hasattr(model, "bert"):
        return model.bert(ids, mask)
    return model(ids, mask)


def _rank_main(rank: int, world: int, opts, task: str, batches, pad_id: int, mask_token: int | None,
               result_path: str, devices) -> None:
    from .runner import _setup_logging, load_rank_model

    _setup_logging()
    if rank != 0:
        logging.getLogger("shardwise").setLevel(logging.WARNING)
    from .parallel.devices import bound_device, put, to_host

    t0 = time.perf_counter()
    device = bound_device() or (devices[rank] if devices else opts.device)  # bound by launch
    sharded, comm = load_rank_model(opts, rank, device)
    shard_s, load_s = comm.max_over_ranks([sharded.stats.seconds, time.perf_counter() - t0])
    values = []
    t1 = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch(batch, pad_id)
            out = to_host(forward(sharded.module, task, put(ids, device), put(mask, device)))
            values += reduce_output(task, out, ids, mask, mask_token)
    seconds = time.perf_counter() - t1
    if rank == 0:
        torch.save({"values": values, "load_seconds": load_s, "shard_seconds": shard_s, "seconds": seconds},
                   result_path)


def run_encoder(opts, config, tokenizer, batches, task: str):
    """Run an encoder task over every batch on the ranks; print and return the results."""
    from .dtypes import resolve_dtype
    from .parallel.launch import default_backend, launch, threads_per_rank
    from .runner import RunResult, resolve_ranks

    plan, mesh, topology = resolve_ranks(opts, config)
    world = mesh.world_size
    longest = max(len(p) for b in batches for p in b)
    if longest > config.max_position_embeddings:
        raise ShardwiseError(f"a prompt of {longest} tokens exceeds the model's {config.max_position_embeddings} "
                             "positions (max_position_embeddings)")
    pad_id = opts.pad_token_id if opts.pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or 0))
    mask_token = getattr(tokenizer, "mask_token_id", None)
    threads = topology.threads[opts.start_rank_id:] if topology else None
    log.info("Model %s (%s): %d layers, %d heads; mesh %s; threads per rank %s", config.architecture, task,
             config.num_layers, config.num_heads, mesh.describe(),
             ",".join(map(str, threads or (threads_per_rank(world),) * world)))
    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        result_path = str(Path(tmp) / "rank0.pt")
        launch(_rank_main, world, (opts, task, batches, pad_id, mask_token, result_path,
                                   topology.devices if topology else None),
               default_backend(opts.device), opts.start_rank_id, opts.local_ranks_size, threads=threads,
               device=opts.device, devices=topology.devices if topology else None)
        if not Path(result_path).exists():
            return RunResult([], [], 0, 0, 0, 0)
        data = torch.load(result_path)
    prompts = [p for b in batches for p in b]
    output = EncoderOutput(task, data["values"])
    texts = [describe(task, v, config, tokenizer) for v in output.values]
    for prompt, text in zip(opts.prompts, texts):
        print(f"\nPrompt: {prompt}\n{text}", flush=True)
    rate = len(prompts) / max(1e-9, data["seconds"])
    log.info("Encoded %d prompts in %.3f s (%.1f prompts/s)", len(prompts), data["seconds"], rate)
    result = RunResult(texts, [], data["load_seconds"], data["shard_seconds"], 0.0, 0.0)
    result.task, result.outputs = task, output
    if opts.check_accuracy_mode != "skip-accuracy-check":
        detail = check_against_hf(opts.model_path, task, batches, pad_id, mask_token, output,
                                  resolve_dtype(opts.torch_dtype, config))
        result.accuracy = detail
        log.info("Accuracy check passed: %s", detail)
    return result


def describe(task: str, value, config, tokenizer) -> str:
    if task == EMBEDDING:
        first = ", ".join(f"{x:.4f}" for x in value[:4].tolist())
        return f"Embedding: dim {value.numel()}, norm {value.norm():.4f}, first values [{first}, ...]"
    if task == CLASSIFICATION:
        best = int(value.argmax())
        scores = ", ".join(f"{config.labels[i]} {p:.4f}" for i, p in enumerate(value.tolist()))
        return f"Label: {config.labels[best]} (score {value[best]:.4f}; {scores})"
    if not value:
        return f"Masked LM: no {getattr(tokenizer, 'mask_token', '[MASK]')} token in the prompt"
    return "Masked LM: " + "; ".join(
        f"mask {i + 1} -> " + ", ".join(f"{tokenizer.decode([t]).strip()!r} {p:.3f}" for t, p in top)
        for i, top in enumerate(value))


def check_against_hf(model_path, task: str, batches, pad_id: int, mask_token, ours: EncoderOutput,
                     dtype: torch.dtype) -> str:
    """Compare with HF transformers on one process: embeddings by cosine, probabilities by max difference."""
    import transformers

    from .config import load_config

    config = load_config(model_path)
    cls = {"BertModel": transformers.AutoModel, "BertForSequenceClassification":
           transformers.AutoModelForSequenceClassification, "BertForMaskedLM": transformers.AutoModelForMaskedLM}
    model = cls[config.architecture].from_pretrained(model_path, dtype=dtype).eval()
    theirs = []
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch(batch, pad_id)
            out = model(input_ids=ids, attention_mask=mask)
            if task == EMBEDDING:
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else None
                if hidden is None:
                    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                theirs += reduce_output(task, hidden, ids, mask, mask_token)
            else:
                theirs += reduce_output(task, out.logits, ids, mask, mask_token)
    if task == EMBEDDING:
        worst = max(1 - float(F.cosine_similarity(a.double(), b.double(), dim=0)) for a, b in zip(ours.values, theirs))
        limit = COSINE_TOLERANCE.get(dtype, 1e-5)
        if worst > limit:
            raise ShardwiseError(f"accuracy check failed: embedding cosine distance {worst:.2e} > {limit:.0e}")
        return f"embeddings within cosine distance {worst:.2e} of HF transformers (limit {limit:.0e})"
    if task == CLASSIFICATION:
        worst = max(float((a - b).abs().max()) for a, b in zip(ours.values, theirs))
        if worst > 1e-4 or any(int(a.argmax()) != int(b.argmax()) for a, b in zip(ours.values, theirs)):
            raise ShardwiseError(f"accuracy check failed: class probabilities differ by {worst:.2e}")
        return f"same labels as HF transformers; probabilities within {worst:.2e}"
    same = all([t for t, _ in m] == [t for t, _ in n] for a, b in zip(ours.values, theirs) for m, n in zip(a, b))
    if not same:
        raise ShardwiseError("accuracy check failed: masked-LM top-3 tokens differ from HF transformers")
    return "masked-LM top-3 tokens identical to HF transformers"
