from __future__ import annotations

import torch

from shardwise.generation import Sampling, sample


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample(logits, Sampling(top_k=1), None).tolist() == [1, 0]


def test_top_k_restricts_choices():
    logits = torch.tensor([[4.0, 3.9, -10.0, -10.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits, Sampling(top_k=2, temperature=1.0), gen)
    assert set(picks.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]])).repeat(300, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits, Sampling(top_k=0, top_p=0.8, temperature=1.0), gen)
    assert set(picks.tolist()) == {0, 1}


def test_sampling_is_seeded():
    logits = torch.randn(4, 50)
    a = sample(logits, Sampling(top_k=10, temperature=0.7), torch.Generator().manual_seed(3))
    b = sample(logits, Sampling(top_k=10, temperature=0.7), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
