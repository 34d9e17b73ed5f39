"""Token choice over candidates, so that a sharded vocabulary picks exactly what the whole one picks.

Sampling is defined on a canonical candidate list: the ``k`` highest logits ordered by (value
descending, token id ascending), which is a total order, so the global top ``k`` is always a subset of
the union of every rank's local top ``k``. Temperature and top-p then run on those ``k`` values and one
uniform draw per row picks a token by inverse CDF. Whether the candidates come from the gathered logits
(``sample``) or from each rank's shard (``sample_sharded``, NxD's on-device sampling), the same ``k``
float values in the same order reach the same arithmetic, so the tokens are identical for the same seed.
Greedy is the ``k = 1`` case: the maximum, ties to the lowest id (what ``argmax`` returns).

``top_k <= 0`` (or at least the vocabulary) means no top-k filter: the candidates are then the whole
vocabulary and on-device sampling saves nothing.
"""

from __future__ import annotations

import torch

from .parallel.comm import Collectives

NEG_INF = float("-inf")


def canonical_top_k(values: torch.Tensor, ids: torch.Tensor, k: int,
                    ids_ascending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of ``values`` (``[batch, n]`` float) with their ``ids``, ordered by value descending and
    id ascending; ``k <= 0`` or ``k >= n`` keeps all ``n``, in that order. ``ids_ascending``: ids increase
    along each row (a whole vocabulary, an evenly split shard), which makes ties at the k-th value cheap."""
    n = values.shape[-1]
    if 0 < k < n:
        top = torch.topk(values, k, dim=-1)
        kth = top.values[..., -1:]
        tied = values == kth
        if torch.equal(tied.sum(-1), (top.values == kth).sum(-1)):
            # The usual case: no value equal to the k-th is left out, so the top k are unambiguous.
            values, ids = top.values, ids.gather(-1, top.indices)
        elif ids_ascending:
            # Ties at the k-th value outnumber the slots left: the lowest ids among them, i.e. the first.
            above = values > kth
            keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
            where = keep.nonzero()[:, 1].view(values.shape[0], k)
            values, ids = values.gather(-1, where), ids.gather(-1, where)
        else:
            keep = values >= kth
            width = int(keep.sum(-1).max())
            order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
            values, ids = values.gather(-1, order), ids.gather(-1, order)
            values = values.masked_fill(~keep.gather(-1, order), NEG_INF)
    by_id = torch.sort(ids, dim=-1, stable=True).indices
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    values, ids = values.gather(-1, by_value), ids.gather(-1, by_value)
    if 0 < k < n:
        values, ids = values[..., :k], ids[..., :k]
    return values, ids


def candidate_probs(values: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """Unnormalised draw weights of canonical candidates: temperature, softmax, then the smallest prefix
    reaching ``top_p`` (the rest zero). ``choose`` draws in proportion to them."""
    probs = (values.float() / temperature).softmax(-1)
    if top_p < 1.0:
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
    return probs


def choose(values: torch.Tensor, ids: torch.Tensor, top_k: int, top_p: float, temperature: float,
           gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from canonical candidates (``canonical_top_k``'s output, float32)."""
    if top_k == 1 or temperature == 0:
        return ids[..., 0]
    probs = candidate_probs(values, top_p, temperature)
    cdf = probs.cumsum(-1)
    u = torch.rand(values.shape[0], 1, generator=gen, dtype=cdf.dtype, device=cdf.device) * cdf[..., -1:]
    pick = (cdf <= u).sum(-1, keepdim=True).clamp(max=values.shape[-1] - 1)
    # A row whose cumulative sum stalls (zero-probability tail) never lands past its last real candidate.
    last_real = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)
    return ids.gather(-1, torch.minimum(pick, last_real)).squeeze(-1)


def sample(logits: torch.Tensor, top_k: int, top_p: float, temperature: float,
           gen: torch.Generator | None) -> torch.Tensor:
    """The gathered path: candidates from the whole vocabulary's logits (``[batch, vocab]``)."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    values, ids = canonical_top_k(logits, ids, top_k, ids_ascending=True)
    return choose(values, ids, top_k, top_p, temperature, gen)


def ids_ascending(local_ids: torch.Tensor) -> bool:
    """Whether a shard's real ids increase along it (an even split does; padding, -1, is ignored)."""
    real = local_ids[local_ids >= 0]
    return bool((real[1:] > real[:-1]).all())


def sample_sharded(local_logits: torch.Tensor, local_ids: torch.Tensor, vocab_size: int, top_k: int, top_p: float,
                   temperature: float, gen: torch.Generator | None, comm: Collectives,
                   ascending: bool | None = None) -> tuple[torch.Tensor, int]:
    """On-device sampling: this rank's logits (``[batch, local]``) and the token id of each local column
    (``[local]``, -1 for padding rows) → the same tokens as ``sample`` on the gathered logits.

    Each rank keeps its canonical top ``k`` (``k = 1`` for greedy), and only those (value, id) pairs,
    float32 (ids are exact below 2**24), are gathered. Returns the tokens and the bytes gathered.
    ``ascending`` is ``ids_ascending(local_ids)``, if the caller has it.
    """
    greedy = top_k == 1 or temperature == 0
    batch = local_logits.shape[0]
    padded = bool((local_ids < 0).any())
    ascending = ids_ascending(local_ids) if ascending is None else ascending
    if greedy and ascending:
        # The local maximum in the logits' own dtype (exact in float32 too) and its first index: the
        # lowest id among ties, since ids increase along a shard (padding, at the end, is masked).
        local = local_logits.masked_fill(local_ids < 0, NEG_INF) if padded else local_logits
        value, where = local.max(-1, keepdim=True)
        packed = torch.cat([value.float(), local_ids[where].float()], dim=-1)
        gathered = comm.all_gather(packed, dim=-1).view(batch, comm.world_size, 2)
        values, ids = gathered[..., 0], gathered[..., 1]
        best = values.max(-1, keepdim=True).values
        ids = torch.where(values == best, ids, torch.full_like(ids, float("inf"))).min(-1).values.long()
        return ids, gathered.numel() * gathered.element_size()
    k = 1 if greedy else top_k
    values = local_logits.float()
    if padded:
        values = values.masked_fill(local_ids < 0, NEG_INF)
    values, ids = canonical_top_k(values, local_ids.expand_as(values), k, ids_ascending=ascending)
    packed = torch.cat([values, ids.float()], dim=-1)  # [batch, 2 * width]: one collective
    gathered = comm.all_gather(packed, dim=-1)
    width = values.shape[-1]
    parts = gathered.view(batch, comm.world_size, 2, width)
    all_values = parts[:, :, 0].reshape(batch, -1)
    all_ids = parts[:, :, 1].reshape(batch, -1).long()
    values, ids = canonical_top_k(all_values, all_ids, k)
    limit = k if 0 < k < vocab_size else vocab_size  # padding rows (-inf, last) are not candidates
    values, ids = values[..., :limit], ids[..., :limit]
    tokens = choose(values, ids, top_k, top_p, temperature, gen)
    return tokens, gathered.numel() * gathered.element_size()
