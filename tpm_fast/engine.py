"""Training and evaluation pieces used by ``train.py``: loaders, optimizer, evaluation, logs, model export."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed
from tpm_fast.data.images import ImageSpec
from tpm_fast.metrics import entity_scores, word_tags
from tpm_fast.model import TPMMI, load_model, save_model

ENCODER_PREFIXES = ("bert.", "images.vit.")


def make_loader(
    dataset: MNERDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    bucket: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`~tpm_fast.data.dataset.PostBatch` with dynamic padding (wrap it in an
    :class:`~tpm_fast.data.feed.ImageFeed` for the images); training loaders shard the data over ranks with a seeded
    shuffle.

    With ``bucket=True`` (training loaders only) batches are length-bucketed
    (:class:`~tpm_fast.data.bucketing.LengthBucketSampler`): posts of similar length share a batch, so batches pad
    little; the batch order is random, seeded by ``seed`` and the epoch (:func:`set_epoch`).
    """
    order: dict = {"sampler": None, "batch_size": batch_size}
    if shuffle and bucket:
        lengths = [len(e["input_ids"]) for e in dataset.encoded]
        order = {"batch_sampler": LengthBucketSampler(lengths, batch_size, world, rank, seed)}
    elif shuffle:
        order["sampler"] = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset,
        **order,
        num_workers=workers,
        collate_fn=dataset.collate_fn,
        persistent_workers=workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Seed a training loader's order for ``epoch`` (its sampler or batch sampler, whichever shuffles)."""
    for order in (loader.batch_sampler, loader.sampler):
        if hasattr(order, "set_epoch"):
            order.set_epoch(epoch)
            return


def to_device(batch: dict, device: torch.device, image_dtype: torch.dtype = torch.float32) -> dict:
    """Move a collated batch to ``device``; images are cast to ``image_dtype`` (the model's compute dtype)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    out["pixel_values"] = out["pixel_values"].to(image_dtype)
    return out


def optimizer_and_schedule(
    model: nn.Module,
    lr: float,
    head_lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    fused: bool = True,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two learning rates (encoders: BERT and ViT; heads: prefix MLP, temporal Transformer, emissions,
    CRF) and no decay on biases and norms; linear warm-up over ``warmup_ratio`` of the steps, then linear decay.

    ``fused=True``: torch's fused AdamW (one multi-tensor kernel per parameter group on CPU and CUDA instead of
    ~10 ops per parameter tensor); the same update to rounding.
    """
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rate = lr if name.startswith(ENCODER_PREFIXES) else head_lr
        decay = 0.0 if param.ndim < 2 else weight_decay  # biases and norm scales are the 1-D parameters
        groups.setdefault((rate, decay), []).append(param)
    params = [{"params": p, "lr": r, "weight_decay": d} for (r, d), p in groups.items()]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused)
    warmup = math.ceil(total_steps * warmup_ratio)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


@torch.no_grad()
def predict_tags(model: nn.Module, feed: ImageFeed, desc: str = "eval", progress: bool = True) -> list[list[str]]:
    """Viterbi-decode an unshuffled feed of an :class:`MNERDataset`: one tag string per word of each post.

    The feed counts the image events of its batches (repaired, missing, ...) in its ``stats``.
    """
    was_training = model.training
    model.eval()
    posts, pred = feed.dataset.posts, []
    for batch in tqdm(feed, desc=desc, leave=False, disable=not progress):
        tags, _ = model.decode(batch.tensors)
        n_words = [len(posts[i].words) for i in batch.host["index"].tolist()]
        pred += word_tags(tags.cpu(), batch.host["first_piece"], n_words, model.config.labels)
    model.train(was_training)
    return pred


def evaluate(model: nn.Module, feed: ImageFeed, **kwargs) -> dict:
    """Decode (:func:`predict_tags`, same keyword arguments) and score entities on first pieces.

    Returns:
        :func:`tpm_fast.metrics.entity_scores` of the whole set.
    """
    pred = predict_tags(model, feed, **kwargs)
    return entity_scores([p.labels for p in feed.dataset.posts], pred)


def export_model(
    model: TPMMI, state_dict: dict, tokenizer, spec: ImageSpec, max_seq_length: int, path: Path, **extra
) -> None:
    """Write an exported model: ``path`` (config, fp32 weights, image spec, max length) and ``tokenizer/`` beside it.

    Everything inference needs is in the two, none of the pretrained folders the model was trained from.
    """
    image_spec = dataclasses.asdict(spec)
    save_model(model, path, dict(extra, max_seq_length=max_seq_length, image_spec=image_spec), state_dict)
    tokenizer.save_pretrained(path.parent / "tokenizer")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[TPMMI, object, ImageSpec, int]:
    """Load what :func:`export_model` wrote: (model in eval mode, tokenizer, image spec, max word pieces)."""
    path = Path(path)
    model, blob = load_model(path, device)
    tokenizer = AutoTokenizer.from_pretrained(path.parent / "tokenizer", local_files_only=True)
    spec = ImageSpec(**blob.get("image_spec", {}))
    return model, tokenizer, spec, blob.get("max_seq_length", 128)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON record as a line (the per-epoch metrics log)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def format_scores(scores: dict) -> str:
    """One line: micro P/R/F1 and the F1 of each entity type."""
    types = " ".join(f"{k}={v['f1-score'] * 100:.1f}" for k, v in sorted(scores["per_type"].items()))
    return f"P={scores['precision'] * 100:.2f} R={scores['recall'] * 100:.2f} F1={scores['f1'] * 100:.2f} | {types}"
