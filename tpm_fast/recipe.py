"""Training recipes: ``--recipe tpm-fast`` (the default) and ``--recipe authors`` (the authors' run.py and model
hyperparameters, to reproduce the paper's TPM-MI row).

A recipe gives the defaults of ``train.py``'s flags (a flag given on the command line wins) and the settings that
have no flag (dropouts, temporal-embedding initialization, weight decay on 1-D parameters, model selection).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

RECIPES = ("tpm-fast", "authors")


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of a recipe.

    Attributes:
        lr: encoder (BERT, ViT) learning rate; None: 5e-5 for a pretrained BERT, 1e-3 for the tiny one.
        head_lr: learning rate of the new layers (prefix MLP, temporal Transformer, emissions, CRF).
        warmup_ratio: share of the optimizer steps with a linear warm-up (then linear decay to 0).
        grad_clip: gradient-norm clipping (0: none).
        weight_decay: AdamW weight decay; decay_1d: also on 1-D parameters (biases, norm scales).
        prefix_dropout, emission_dropout: dropout on the prefix vectors and before the emission layer.
        temporal_init_std: std of the temporal embedding's normal initialization.
        batch_size, max_seq_length, seed: posts per micro-batch, word pieces per post, the run's seed.
        image_padding, image_feature: empty image slots and the ViT feature (see ``TPMConfig``).
        select_ties: the best model is the last one whose dev F1 is >= the best so far (else strictly better).
    """

    lr: float | None
    head_lr: float
    warmup_ratio: float
    grad_clip: float
    weight_decay: float
    decay_1d: bool
    prefix_dropout: float
    emission_dropout: float
    temporal_init_std: float
    batch_size: int
    max_seq_length: int
    seed: int
    image_padding: str
    image_feature: str
    select_ties: bool


TPM_FAST = Recipe(
    lr=None,
    head_lr=1e-3,  # the new layers start from random: a higher rate than the pretrained encoders (faster to converge)
    warmup_ratio=0.1,
    grad_clip=1.0,
    weight_decay=0.01,
    decay_1d=False,
    prefix_dropout=0.1,
    emission_dropout=0.1,
    temporal_init_std=0.02,
    batch_size=16,
    max_seq_length=128,
    seed=42,
    image_padding="zero_feature",
    image_feature="cls",
    select_ties=False,
)
# The authors' run.py: torch AdamW (weight decay 0.01 on every parameter) at 5e-5 for all parameters, 1 % warm-up,
# no clipping, no dropout on the prefix or before the emission layer (the temporal Transformer keeps torch's 0.1),
# nn.Parameter(torch.randn(4, 768)) as temporal embedding, batch 8 of 64 pieces, seed 1234, an all-zero image in
# empty slots through ViT, ViT's pooler output, and the model saved whenever dev F1 >= the best.
AUTHORS = Recipe(
    lr=5e-5,
    head_lr=5e-5,
    warmup_ratio=0.01,
    grad_clip=0.0,
    weight_decay=0.01,
    decay_1d=True,
    prefix_dropout=0.0,
    emission_dropout=0.0,
    temporal_init_std=1.0,
    batch_size=8,
    max_seq_length=64,
    seed=1234,
    image_padding="zero_pixel",
    image_feature="pooler",
    select_ties=True,
)
BY_NAME = {"tpm-fast": TPM_FAST, "authors": AUTHORS}
FLAGS = ("lr", "head_lr", "warmup_ratio", "grad_clip", "weight_decay", "batch_size", "max_seq_length", "seed",
         "image_padding", "image_feature")  # fmt: skip


def apply_recipe(args: argparse.Namespace, given: set[str]) -> Recipe:
    """Fill the recipe's defaults into ``args`` for the flags not in ``given`` (argparse dests set on the command
    line).

    Returns:
        The recipe (its settings without a flag are the run's; its flag values may have been overridden).
    """
    recipe = BY_NAME[args.recipe]
    for name in FLAGS:
        if name not in given:
            setattr(args, name, getattr(recipe, name))
    return recipe
