"""Helpers shared by several test files: a brute-force CRF oracle and a tiny HF BERT (imported as tests.oracles)."""

from __future__ import annotations

import itertools

import torch
from transformers import BertConfig, BertModel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the backend="triton" tests run: the GPU when there is one (compiled kernels), else the CPU interpreter."""


def brute_force_crf(em, mask, start, end, trans):
    """All tag paths of each sequence enumerated (differentiable; use fp64): (log Z (B,), best path per sequence)."""
    log_z, best = [], []
    for i in range(em.shape[0]):
        n_i = int(mask[i].sum())
        paths = torch.tensor(list(itertools.product(range(em.shape[2]), repeat=n_i)))  # shape: (P, n_i)
        score = start[paths[:, 0]] + end[paths[:, -1]] + em[i, torch.arange(n_i), paths].sum(1)
        score = score + trans[paths[:, :-1], paths[:, 1:]].sum(1)  # shape: (P,)
        log_z.append(torch.logsumexp(score, 0))
        best.append(paths[score.argmax()].tolist())
    return torch.stack(log_z), best


def tiny_bert(layers: int = 2, heads: int = 2, head_dim: int = 16, attn: str = "eager", vocab: int = 50) -> BertModel:
    """A randomly initialized BERT without dropout or pooler (seeded: the same weights at every call)."""
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * heads * head_dim,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False)
