"""Train, evaluate and export TPM-MI with DeepSpeed ZeRO.

    deepspeed train.py                      # embedded synthetic multi-image corpus, tiny BERT + ViT, CPU is fine
    deepspeed train.py --data-dir DATA --dataset MI --bert-model BERT_DIR --vit-model VIT_DIR
    python train.py --eval-only --checkpoint runs/default/best_model
    deepspeed --num_gpus 2 train.py         # two ranks (two CPU processes without a GPU)

Each step appends its loss to OUTPUT/metrics.jsonl; every ``--save-every`` steps and at each epoch end an atomic
checkpoint is written (OUTPUT/checkpoints/step<N>: weights, optimizer, schedule, generator states, position in the
epoch's data order, best dev state); each epoch decodes the dev set, appends its metrics and exports
OUTPUT/best_model (a folder: ``tpm_fast.export``) from the checkpoint when the dev F1 improves. ``--resume``
continues from the newest complete checkpoint exactly as the run would have gone on. At the end the best model is
scored on the test set (its model card gets the scores), and its test and dev predictions are written to
OUTPUT/predictions/{test,val}.conll with error reports (python -m tpm_fast.report).

Defaults are the fastest correct configuration for the machine, chosen and printed in the first lines: on one rank
the DeepSpeed engine is bypassed (``--zero-stage off``: ZeRO has nothing to partition), several ranks get a ZeRO
stage by model size; bf16 (fp32 master weights) where the hardware has bf16; length-bucketed batches where padding
would cost a quarter of the FLOPs; fused AdamW; image and compute threads that never oversubscribe the cores; the
image loader (DALI on a GPU, else the decoded-image cache given ``--image-cache``, else PIL's thread pool).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed

from tpm_fast import session, trainer
from tpm_fast.config import given_flags, read_deepspeed_config
from tpm_fast.data.readers import DataFormatError
from tpm_fast.model import IMAGE_MODES
from tpm_fast.ops.backend import BACKENDS
from tpm_fast.recipe import RECIPES, apply_recipe
from tpm_fast.runtime import BUCKETING, IMAGE_LOADERS, PRECISIONS, ZERO_STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        help="dataset folder, flat or as downloaded (the authors' Dataset/, UMT's data/; README: Getting the data); "
        "default: the embedded synthetic corpus, made on first use",
    )
    g.add_argument(
        "--dataset",
        default="MI",
        choices=["MI", "UNI", "twitter2015", "twitter2017"],
        help="MI: MNER-MI_*.txt; UNI: MNER-UNI_*.txt (MNER-MI-Plus); twitter*: CoNLL {train,valid,test}.txt",
    )
    g.add_argument(
        "--image-dir",
        help="image folder (default DATA/images; for TWITTER the first of DATA/images, DATA/<dataset>_images, "
        "DATA/../<dataset>_images that exists)",
    )
    g.add_argument("--twitter2017-image-dir", help="TWITTER-2017 images of MNER-UNI (default DATA/twitter2017_images)")
    g.add_argument("--limit", type=int, help="use only the first N posts of each split (quick trials)")
    g.add_argument("--max-seq-length", type=int, help="word pieces per post, with [CLS] and [SEP] (recipe: 128 / 64)")
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
    g.add_argument(
        "--image-padding",
        choices=["zero_feature", "zero_pixel"],
        help="empty slots (recipe: zero_feature / zero_pixel)",
    )
    g.add_argument("--image-feature", choices=["cls", "pooler"], help="ViT feature (recipe: cls / pooler)")
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
    g.add_argument(
        "--recipe",
        default="tpm-fast",
        choices=RECIPES,
        help="defaults of the flags marked 'recipe' (tpm-fast / authors) and of dropouts, initialization, weight decay "
        "on 1-D parameters and model selection: authors = the authors' run.py (README: Where we differ)",
    )
    g.add_argument("--batch-size", type=int, help="posts per rank and micro-batch (recipe: 16 / 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, help="BERT/ViT learning rate (recipe: 5e-5 pretrained, 1e-3 tiny / 5e-5)")
    g.add_argument(
        "--head-lr", type=float, help="prefix, temporal, emission and CRF learning rate (recipe: 1e-3 / 5e-5)"
    )
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (recipe: 0.01, not on 1-D parameters / 0.01)")
    g.add_argument("--warmup-ratio", type=float, help="share of steps with linear warm-up (recipe: 0.1 / 0.01)")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clipping, 0: none (recipe: 1.0 / 0)")
    g.add_argument("--seed", type=int, help="(recipe: 42 / 1234)")
    g.add_argument(
        "--zero-stage",
        default="auto",
        choices=ZERO_STAGES,
        help="DeepSpeed ZeRO stage (0 = plain data parallel); off = no DeepSpeed engine (one rank); auto = off on one "
        "rank, else chosen by model size",
    )
    g.add_argument(
        "--deepspeed_config",
        metavar="FILE",
        help="a DeepSpeed JSON config (DeepSpeed's own flag): its micro-batch, accumulation, precision, ZeRO stage, "
        "clipping and other settings become the run's; train.py builds the optimizer and schedule",
    )
    one = g.add_mutually_exclusive_group()
    one.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 = bf16 weights with fp32 master weights (as DeepSpeed's bf16); fp16 = DeepSpeed's fp16 with dynamic "
        "loss scaling (GPUs without bf16); auto = bf16 where the hardware has it and the model is large enough to gain",
    )
    one.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="same as --precision bf16")
    one.add_argument("--fp16", action="store_const", const="fp16", dest="precision", help="same as --precision fp16")
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
        "--keep-checkpoints", type=int, default=2, help="newest checkpoints kept on disk (plus the export's source)"
    )
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after N non-finite steps in a row (each skipped)")
    g.add_argument("--eval-only", action="store_true", help="score --checkpoint on the dev and test sets")
    g.add_argument("--checkpoint", help="the export OUTPUT/best_model, or a legacy best_model.pt (for --eval-only)")
    g.add_argument(
        "--write-predictions",
        action="store_true",
        help="with --eval-only: also write OUTPUT/predictions/{val,test}.conll (word, gold, predicted) and their error "
        "reports (training runs write them at the final test)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the traceback of data errors (else one line)")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    args.recipe_settings = apply_recipe(args, given)  # defaults of the flags not given, and the settings without one
    args.ds_config = None  # the --deepspeed_config file's settings, once read
    if args.deepspeed_config:
        args.ds_config = read_deepspeed_config(args.deepspeed_config, args, given)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint OUTPUT/best_model")
    if args.write_predictions and not args.eval_only:
        p.error("--write-predictions goes with --eval-only (training runs write predictions at their final test)")
    if args.checkpoint and not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint}: no such folder (the export OUTPUT/best_model) or legacy file")
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
    if not args.eval_only:
        trainer.refuse_other_run(Path(args.output_dir), bool(args.resume))
    s = session.prepare(args)  # seeds, ranks, data, tokenizer, images
    if args.eval_only:
        trainer.evaluate_only(s)
        return
    t = session.build_training(s)  # model, optimizer, engine, loaders
    started = trainer.start(s, t)  # a new run, or where the checkpoint --resume names left off
    if started is None:  # that run had finished
        return
    state, steps = started
    for epoch in range(state.epoch + 1, args.epochs + 1):
        work = trainer.train_epoch(s, t, state, epoch, steps)
        trainer.end_epoch(s, t, state, epoch, work)  # dev scores, log, checkpoint, export
    trainer.final_test(s, state)
    deepspeed.comm.barrier()


if __name__ == "__main__":
    main()
