"""Training and evaluation pieces used by ``train.py``: loaders, optimizer, evaluation, logs, model export."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, SequentialSampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed
from tpm_fast.data.images import ImageSpec
from tpm_fast.export import load_pretrained, save_pretrained
from tpm_fast.metrics import entity_scores, word_tags
from tpm_fast.model import TPMMI
from tpm_fast.plain_engine import PlainEngine

ENCODER_PREFIXES = ("bert.", "images.vit.")


class ResumableBatches(Sampler[list[int]]):
    """A batch sampler whose epoch can start part-way through its order (resuming a checkpoint exactly).

    Args:
        batches: the batch sampler giving the epoch's order (a function of its seed and epoch only).
    """

    def __init__(self, batches: Sampler[list[int]]) -> None:
        self.batches = batches
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Seed the order for ``epoch`` (the inner batch sampler's, or its sampler's); iterations start at its batch
        ``skip`` (the ones before it were trained before a resume). An iteration may be started more than once
        (a DataLoader with workers starts one to build its iterator, and another for the epoch)."""
        order = self.batches if hasattr(self.batches, "set_epoch") else getattr(self.batches, "sampler", None)
        if hasattr(order, "set_epoch"):
            order.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip, None)


def seed_worker(seed: int, worker_id: int) -> None:
    """``worker_init_fn``: seed a DataLoader worker's Python, numpy and torch generators from (run seed, worker id).

    A worker's generators are then the same in a resumed process as in the original one, and the main process's
    generators (dropout) are not drawn from when workers start.
    """
    state = np.random.SeedSequence([seed, worker_id]).generate_state(1)[0]
    random.seed(int(state))
    np.random.seed(int(state))
    torch.manual_seed(int(state))


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
    little; the batch order is random, seeded by ``seed`` and the epoch (:func:`set_epoch`). Training loaders'
    batch samplers are :class:`ResumableBatches`. The loader draws its workers' base seed from its own generator
    (seeded by ``seed``) and :func:`seed_worker` seeds each worker, so iterating never advances the process's
    generators: a run's dropout draws are the same whether or not it was resumed.
    """
    if shuffle and bucket:
        lengths = [len(e["input_ids"]) for e in dataset.encoded]
        batches = ResumableBatches(LengthBucketSampler(lengths, batch_size, world, rank, seed))
    elif shuffle:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
        batches = ResumableBatches(BatchSampler(sampler, batch_size, drop_last=False))
    else:
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=dataset.collate_fn,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=partial(seed_worker, seed * 1000 + rank) if workers else None,
    )


def set_epoch(loader: DataLoader, epoch: int, skip: int = 0) -> None:
    """Seed a training loader's order for ``epoch``; its next iteration starts at batch ``skip`` of that order."""
    loader.batch_sampler.set_epoch(epoch, skip)


class GuardedSteps:
    """Backward on each micro-batch and an optimizer step every ``accumulation`` of them (the last step of an epoch
    may take fewer), skipping steps whose loss or gradients are not finite (NaN or inf).

    A skipped step changes no weight, optimizer state or schedule. Without accumulation a non-finite loss skips the
    backward too (with several ranks, a non-finite loss on any rank skips the step on all of them), and non-finite
    gradients are caught by ``PlainEngine.step`` (which returns False) or by DeepSpeed's ZeRO-1/2 optimizer (counted
    in its ``skipped_steps``). With accumulation every micro-batch is backpropagated (the ranks' collectives stay in
    step) and a non-finite loss reaches the gradients, where those two checks skip the step; DeepSpeed's
    ZeRO-0/3 have no such check, so ``train.py`` refuses accumulation there. One host read of the loss per
    micro-batch.

    Args:
        engine: ``PlainEngine`` or a DeepSpeed engine (whose gradient accumulation boundaries are set here).
        accumulation: micro-batches per optimizer step.
    """

    def __init__(self, engine, accumulation: int = 1) -> None:
        self.engine = engine
        self.accumulation = accumulation
        self.deepspeed = not isinstance(engine, PlainEngine)
        self.losses: list[float] = []

    def begin(self, boundary: bool) -> None:
        """Call before a micro-batch's forward; ``boundary``: the micro-batch ends an optimizer step."""
        if self.accumulation > 1 and self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(boundary)

    def backward(self, loss: torch.Tensor, size: int, boundary: bool) -> tuple[float, bool] | None:
        """Backpropagate one micro-batch's loss (divided by ``size``, the micro-batches of its step); at a
        ``boundary``, step the optimizer.

        Returns:
            None inside an accumulation; at a boundary (the step's mean micro-batch loss, whether it was applied).
        """
        value = float(loss.detach())
        self.losses.append(value)
        if self.accumulation == 1:
            applied = self._step_unless_nonfinite(loss, value)
        else:
            scaled = loss / size if size > 1 else loss
            if self.deepspeed:
                self.engine.backward(scaled, scale_wrt_gas=False)
            else:
                self.engine.backward(scaled)
            if not boundary:
                return None
            applied = self._step() and all(math.isfinite(v) for v in self.losses)
        mean, self.losses = sum(self.losses) / len(self.losses), []
        return mean, applied

    def _step_unless_nonfinite(self, loss: torch.Tensor, value: float) -> bool:
        finite = math.isfinite(value)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:  # all ranks skip, or none
            flag = torch.tensor([float(finite)], device=loss.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            return False
        self.engine.backward(loss)
        return self._step()

    def _step(self) -> bool:
        skipped = getattr(self.engine, "skipped_steps", 0)
        applied = self.engine.step()
        return self.engine.skipped_steps == skipped if self.deepspeed else applied


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
    decay_1d: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two learning rates (encoders: BERT and ViT; heads: prefix MLP, temporal Transformer, emissions,
    CRF) and no decay on biases and norms (``decay_1d=True``: on every parameter, as the authors' run.py); linear
    warm-up over ``warmup_ratio`` of the steps, then linear decay.

    ``fused=True``: torch's fused AdamW (one multi-tensor kernel per parameter group on CPU and CUDA instead of
    ~10 ops per parameter tensor); the same update to rounding.
    """
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rate = lr if name.startswith(ENCODER_PREFIXES) else head_lr
        decay = 0.0 if param.ndim < 2 and not decay_1d else weight_decay  # biases and norm scales are 1-D
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
    model: TPMMI,
    state_dict: dict,
    tokenizer,
    spec: ImageSpec,
    max_seq_length: int,
    path: Path,
    card: dict | None = None,
    files: dict[str, Path] | None = None,
    **training,
) -> Path:
    """Write the export folder ``path`` (:func:`tpm_fast.export.save_pretrained`): config, fp32 ``state_dict``,
    tokenizer, image settings, model card, ``files`` (name -> path, copied in); ``training`` (e.g. ``epoch``,
    ``step``) is recorded in its config.

    Everything inference needs is in the folder, none of the pretrained folders the model was trained from.

    Returns:
        ``path``.
    """
    return save_pretrained(model, path, tokenizer=tokenizer, image_spec=spec, max_seq_length=max_seq_length,
                           state_dict=state_dict, card=card, training=training, files=files)  # fmt: skip


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[TPMMI, object, ImageSpec, int]:
    """Load an export folder or a legacy ``best_model.pt`` (:func:`tpm_fast.export.load_pretrained`): (model in eval
    mode, tokenizer, image spec, max word pieces)."""
    exported = load_pretrained(path, device)
    return exported.model, exported.tokenizer, exported.image_spec, exported.max_seq_length


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON record as a line (the per-epoch metrics log)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def step_record(state, epoch: int, loss: float, applied: bool, lrs: list[float]) -> dict:
    """The ``metrics.jsonl`` record of one training step (``state``: the run's :class:`~tpm_fast.checkpoint.TrainState`
    after the step): step, epoch, loss (None when not finite), learning rates, and ``skipped`` for a skipped step."""
    record = {"step": state.step, "epoch": epoch, "loss": loss if math.isfinite(loss) else None, "lr": lrs}
    return record if applied else dict(record, skipped=True)


def format_scores(scores: dict) -> str:
    """One line: micro P/R/F1 and the F1 of each entity type."""
    types = " ".join(f"{k}={v['f1-score'] * 100:.1f}" for k, v in sorted(scores["per_type"].items()))
    return f"P={scores['precision'] * 100:.2f} R={scores['recall'] * 100:.2f} F1={scores['f1'] * 100:.2f} | {types}"
