"""Training and evaluation pieces used by ``train.py``: loaders, optimizer, evaluation, logs, model export.

With several ranks (``torch.distributed`` initialized, gloo on CPU, nccl on GPU) training loaders shard the data with
a seeded shuffle, evaluation loaders deal out the one-rank run's batches (:class:`EvalShards`), :func:`predict_tags`
gathers every rank's predictions in the data's order, and :class:`GuardedSteps` and :func:`summed_over_ranks` sum the
logged loss, posts and image counts over the ranks; with one rank nothing here needs ``torch.distributed``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from tpm_fast.checkpoint import StopRequest
from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, assemble
from tpm_fast.data.images import ImageSpec, ImageStats
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


class EvalShards(Sampler[list[int]]):
    """The unshuffled batches of one rank: the one-rank run's batches (``batch_size`` consecutive posts each, the last
    one shorter), dealt out to the ranks in contiguous blocks whose sizes differ by at most one batch.

    Every post is in exactly one rank's batches, and every batch holds the posts it holds on one rank, so decoding
    gives the one-rank predictions exactly; concatenating the ranks' predictions in rank order gives the data's order.

    Args:
        n: posts in the dataset.
        batch_size: posts per batch.
        world, rank: data-parallel ranks and this one.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0) -> None:
        if batch_size < 1 or world < 1 or not 0 <= rank < world or n < 0:
            raise ValueError(f"bad n={n}, batch_size={batch_size}, world={world} or rank={rank}")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        total = -(-n // batch_size)
        self.bounds = [r * total // world for r in range(world + 1)]  # rank r: batches bounds[r] .. bounds[r+1]-1

    @property
    def most(self) -> int:
        """The batches of the rank with the most (ranks with fewer run as many forwards: see :func:`predict_tags`)."""
        return max(b - a for a, b in itertools.pairwise(self.bounds))

    def __len__(self) -> int:
        return self.bounds[self.rank + 1] - self.bounds[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.bounds[self.rank], self.bounds[self.rank + 1]):
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))


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
    :class:`~tpm_fast.data.feed.ImageFeed` for the images). Training loaders (``shuffle=True``) shard the data over
    ranks with a seeded shuffle (``DistributedSampler``, which pads the data to a multiple of ``world`` by repeating
    posts); unshuffled loaders give rank ``rank`` its block of the one-rank batches (:class:`EvalShards`, no post
    repeated), for :func:`predict_tags` to gather.

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
        batches = EvalShards(len(dataset), batch_size, world, rank)
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
    ZeRO-0/3 have no such check, so ``train.py`` refuses accumulation there.

    The step's loss is the mean over all ranks' posts (each micro-batch's mean loss weighted by its ``posts``): the
    losses stay on the device until the step's boundary, where one all-reduce of (loss sum, posts, stop requests)
    over the ranks gives the mean, the step's posts (:attr:`posts`), whether any rank's loss was non-finite and
    whether any rank was asked to stop (:attr:`stopping`); one host read of it per optimizer step.

    Args:
        engine: ``PlainEngine`` or a DeepSpeed engine (whose gradient accumulation boundaries are set here).
        accumulation: micro-batches per optimizer step.
        stop: the SIGTERM catcher whose request travels with the step's all-reduce (None: never stop).

    Attributes:
        posts: the posts of the last optimizer step, summed over the ranks.
        stopping: some rank had been asked to stop when the last optimizer step's losses were reduced (all ranks
            agree, so they stop at the same step).
    """

    def __init__(self, engine, accumulation: int = 1, stop: StopRequest | None = None) -> None:
        self.engine = engine
        self.accumulation = accumulation
        self.deepspeed = not isinstance(engine, PlainEngine)
        self.stop = stop
        self.posts = 0
        self.stopping = False
        self._sums: torch.Tensor | None = None  # shape: (2,) float64: the step's sum of loss x posts, and its posts

    def begin(self, boundary: bool) -> None:
        """Call before a micro-batch's forward; ``boundary``: the micro-batch ends an optimizer step."""
        if self.accumulation > 1 and self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(boundary)

    def backward(self, loss: torch.Tensor, size: int, boundary: bool, posts: int = 1) -> tuple[float, bool] | None:
        """Backpropagate one micro-batch's loss (divided by ``size``, the micro-batches of its step); at a
        ``boundary``, step the optimizer.

        Args:
            loss: the micro-batch's mean loss (a scalar).
            size: micro-batches of this optimizer step.
            boundary: the micro-batch ends the step.
            posts: posts of the micro-batch on this rank (the weight of its loss in the step's mean).

        Returns:
            None inside an accumulation; at a boundary (the step's mean loss over all ranks' posts, whether the step
            was applied).
        """
        weighted = loss.detach().double() * posts  # stays on the device: no host read per micro-batch
        sums = torch.stack([weighted, torch.full_like(weighted, posts)])
        self._sums = sums if self._sums is None else self._sums + sums
        if self.accumulation == 1:
            total, count = self._reduce()
            applied = math.isfinite(total)  # all ranks skip, or none: the sum is non-finite if any rank's loss is
            if applied:
                self.engine.backward(loss)
                applied = self._step()
        else:
            scaled = loss / size if size > 1 else loss
            if self.deepspeed:
                self.engine.backward(scaled, scale_wrt_gas=False)
            else:
                self.engine.backward(scaled)
            if not boundary:
                return None
            total, count = self._reduce()
            applied = self._step() and math.isfinite(total)
        self.posts = int(count)
        return total / count, applied

    def _reduce(self) -> tuple[float, float]:
        """The step's (sum of loss x posts, posts) over all ranks (one all-reduce with several, which also carries
        the stop requests into :attr:`stopping`); resets the sums."""
        requested = float(self.stop is not None and self.stop.requested)
        sums = torch.cat([self._sums, self._sums.new_full((1,), requested)])  # shape: (3,); a fill, no host copy
        self._sums = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        total, count, requests = sums.tolist()
        self.stopping = requests > 0
        return total, count

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

    With several ranks (the feed's batches are an :class:`EvalShards` of ``world > 1``, from :func:`make_loader`)
    every rank calls this: each decodes its own batches, then the predictions are gathered (one all-gather, after the
    loop), so every rank returns those of the whole dataset, in its order, exactly as one rank decoding everything.
    A rank with fewer batches than another decodes a one-post batch for each missing one and drops the result: the
    ranks run as many forwards (ZeRO-3 gathers the parameters in each).

    The feed counts the image events of its batches (repaired, missing, ...) in its ``stats``: with several ranks each
    rank counts its own batches' (:func:`summed_over_ranks` sums them).

    Args:
        model: a :class:`~tpm_fast.model.TPMMI` (or a module wrapping one, with ``decode`` and ``config.labels``).
        feed: the feed of an unshuffled loader (:func:`make_loader` with ``shuffle=False``).
        desc, progress: the progress bar's label, and whether to show it.

    Returns:
        One list of tag strings per post of ``feed.dataset``, as long as the post's words.
    """
    was_training = model.training
    model.eval()
    posts, pred = feed.dataset.posts, []
    for batch in tqdm(feed, desc=desc, leave=False, disable=not progress):
        tags, _ = model.decode(batch.tensors)
        n_words = [len(posts[i].words) for i in batch.host["index"].tolist()]
        pred += word_tags(tags.cpu(), batch.host["first_piece"], n_words, model.config.labels)
    shards = feed.loader.batch_sampler
    if isinstance(shards, EvalShards) and shards.world > 1:
        if len(shards) < shards.most:  # the first post, assembled here: its images are not counted again
            filler = assemble(feed.loader.collate_fn([feed.dataset[0]]), feed.source, feed.device, feed.dtype)
            for _ in range(shards.most - len(shards)):
                model.decode(filler.tensors)
        parts: list[list[list[str]]] = [[] for _ in range(shards.world)]
        torch.distributed.all_gather_object(parts, pred)
        pred = [tags for part in parts for tags in part]  # rank order = the data's order
    model.train(was_training)
    if len(pred) != len(posts):
        raise RuntimeError(f"decoded {len(pred)} of {len(posts)} posts: the feed must come from an unshuffled loader")
    return pred


def evaluate(model: nn.Module, feed: ImageFeed, **kwargs) -> dict:
    """Decode (:func:`predict_tags`, same keyword arguments; with several ranks, every rank calls this) and score
    entities on first pieces.

    Returns:
        :func:`tpm_fast.metrics.entity_scores` of the whole set (the same on every rank).
    """
    pred = predict_tags(model, feed, **kwargs)
    return entity_scores([p.labels for p in feed.dataset.posts], pred)


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (one all-reduce; every rank calls this); ``values`` itself
    without ``torch.distributed`` or with one rank. Integers up to 2**53 stay exact (float64)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [float(v) for v in values]
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    sums = torch.tensor(list(values), dtype=torch.float64, device=device)  # shape: (len(values),)
    torch.distributed.all_reduce(sums)
    return sums.tolist()


def summed_over_ranks(stats: ImageStats) -> ImageStats:
    """A new :class:`~tpm_fast.data.images.ImageStats` holding ``stats``' counters summed over all ranks (every rank
    calls this; each rank's ``stats`` count the images of its own batches, so the sum counts each image once)."""
    sums = sum_over_ranks([getattr(stats, k) for k in ImageStats.COUNTERS])
    return ImageStats(**{k: int(v) for k, v in zip(ImageStats.COUNTERS, sums)})


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
