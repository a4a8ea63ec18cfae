"""The steps of ``train.py`` after set-up (:mod:`tpm_fast.session`): resume, train one epoch, evaluate on the dev set,
checkpoint and export, score the test set. Every rank calls each of them; records are written by rank 0.

With several ranks every rank decodes its shard of the dev and test sets (gathered by
:func:`tpm_fast.engine.evaluate`), and what is logged is the run's, not rank 0's: step and epoch losses are means over
all ranks' posts, posts/s counts every rank's posts, image counts are summed over the ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import deepspeed
from tqdm import tqdm

from tpm_fast import checkpoint
from tpm_fast.checkpoint import TrainState, checkpoint_weights, exported_step, finished, resume_folder, tag_of
from tpm_fast.engine import (
    GuardedSteps,
    append_jsonl,
    evaluate,
    export_model,
    format_scores,
    load_exported,
    predict_tags,
    set_epoch,
    step_record,
    summed_over_ranks,
)
from tpm_fast.export import update_card
from tpm_fast.flops import step_flops
from tpm_fast.metrics import entity_scores, word_tags
from tpm_fast.plain_engine import CHECKPOINT_FILE
from tpm_fast.record import RUN_FILE, device_info, differences, read_record, run_record, write_record
from tpm_fast.report import evaluation_report, tagged_posts, write_predictions
from tpm_fast.session import Session, Training

POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each reads the loss on the host: a sync on GPU)
EXPORT = "best_model"  # the export folder in OUTPUT (tpm_fast.export)
NOT_RECIPE = ("output_dir", "resume", "save_every", "keep_checkpoints", "eval_only", "checkpoint", "no_progress",
              "debug", "local_rank", "data_dir", "dataset", "image_dir", "twitter2017_image_dir", "seed",
              "ds_config")  # fmt: skip


def refuse_other_run(out, resume: bool) -> None:
    """Stop before any work when ``out`` holds another run's checkpoints or metrics and ``resume`` is not set."""
    if not resume and (checkpoint.checkpoints(out / "checkpoints") or (out / "metrics.jsonl").exists()):
        raise SystemExit(
            f"{out} holds another run (checkpoints or metrics.jsonl): --resume continues it; for a new run choose "
            "another --output-dir or delete that one"
        )


def warn_if_data_changed(s: Session, recorded: dict, what: str) -> None:
    """Warn, naming each file, where this run's data differs from the data of a run record."""
    for line in differences(recorded.get("data", {}), s.data):
        s.say(f"warning: not the data {what}: {line}")


def predictions(s: Session, model, split: str, desc: str) -> dict:
    """Decode ``split`` with ``model`` (every rank calls this and decodes its shard; the predictions are gathered) and,
    on rank 0, write OUTPUT/predictions/<split>.conll and its report (:func:`tpm_fast.report.write_predictions`).

    Returns:
        The report, on every rank: micro ``precision``/``recall``/``f1`` and ``per_type`` as
        :func:`~tpm_fast.engine.evaluate`'s, plus ``by_images`` and the error counts.
    """
    data = s.dataset(split)
    pred = predict_tags(model, s.feed(data, s.args.eval_batch_size), desc=desc, progress=s.progress)
    if s.rank == 0:
        return write_predictions(s.out / "predictions", split, data.posts, pred)
    return evaluation_report(tagged_posts(data.posts, pred))


def evaluate_only(s: Session) -> None:
    """``--eval-only``: score the exported model on the dev and test sets (its fp32 weights, as the run did);
    with ``--write-predictions`` rank 0 also writes their predictions and reports into OUTPUT/predictions. Warns
    when the data differs from what the model's run recorded (``run.json`` beside or in the export)."""
    exported = Path(s.args.checkpoint)
    recorded = read_record(exported) if exported.is_dir() else None
    recorded = recorded or read_record(exported.parent)
    if s.rank == 0 and recorded:
        warn_if_data_changed(s, recorded, "the model was trained and scored on")
    for split in ("val", "test"):
        if s.args.write_predictions:  # every rank decodes its shard; rank 0 writes
            scores = predictions(s, s.model, split, split)
        else:
            scores = evaluate(s.model, s.feed(s.dataset(split), s.args.eval_batch_size), progress=s.progress)
        s.say(f"{split}: {format_scores(scores)}")
    if s.args.write_predictions:
        s.say(f"predictions and reports in {s.out / 'predictions'}")
    s.say(summed_over_ranks(s.stats).summary())


def save(s: Session, t: Training, state: TrainState) -> None:
    """Every rank: an atomic checkpoint at ``state.step``, then (rank 0) the rotation of old ones."""
    metrics = s.out / "metrics.jsonl"
    state.images = summed_over_ranks(s.stats).as_dict()  # the run's counts (restored on rank 0 only)
    state.metrics_bytes = metrics.stat().st_size if metrics.is_file() else 0
    checkpoint.save(t.engine, s.out / "checkpoints", state, s.rank, deepspeed.comm.barrier)
    if s.rank == 0:
        checkpoint.rotate(s.out / "checkpoints", s.args.keep_checkpoints, state.best_step)


def model_card(s: Session, t: Training, dev: dict) -> dict:
    """The export's model card facts: data, recipe (the training arguments, the precision and ZeRO stage chosen),
    seed, and the dev scores ``dev`` (the test scores join after the final test)."""
    args = s.args
    data = {"folder": args.data_dir or "the embedded synthetic corpus", "dataset": args.dataset if args.data_dir
            else "synthetic", "posts": {split: len(p) for split, p in s.posts.items()}}  # fmt: skip
    recipe = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE and v is not None}
    settings = recipe.pop("recipe_settings", None)  # the --recipe's settings that have no flag (dropouts, init, ...)
    for key, value in dataclasses.asdict(settings).items() if settings else ():
        if key not in recipe and key not in NOT_RECIPE:
            recipe[key] = value
    recipe.update(precision=t.precision, zero_stage=t.stage, ranks=s.world)
    return {"data": data, "recipe": recipe, "seeds": [args.seed], "scores": {"dev": dev}}


def export_best(s: Session, t: Training, state: TrainState, dev: dict | None = None) -> None:
    """Rank 0: the ``best_model`` export from the checkpoint of the best step (so the two never disagree).

    Args:
        dev: the best epoch's dev scores for the model card (None: read from its record in ``metrics.jsonl``).
    """
    weights = checkpoint_weights(s.out / "checkpoints" / tag_of(state.best_step))
    if dev is None:  # a resume re-exports: the best epoch's record is in the log (cut back to the checkpoint)
        records = map(json.loads, (s.out / "metrics.jsonl").read_text().splitlines())
        best = next((r for r in records if "dev_f1" in r and r["step"] == state.best_step), {"dev_f1": state.best_f1})
        dev = {k: best.get(f"dev_{k}") for k in ("precision", "recall", "f1")}
    dev = {k: dev[k] for k in ("precision", "recall", "f1")}
    record = {RUN_FILE: s.out / RUN_FILE} if (s.out / RUN_FILE).is_file() else {}  # the run record travels along
    export_model(t.model, weights, s.tokenizer, s.spec, s.max_len, s.out / EXPORT, card=model_card(s, t, dev),
                 files=record, epoch=state.best_epoch, step=state.best_step)  # fmt: skip


def resume(s: Session, t: Training) -> tuple[TrainState, dict | None] | None:
    """Load the checkpoint ``--resume`` names (or the newest complete one) into the engine.

    Returns:
        (the run's state, the generator states to restore once set-up is over), or None when the run had finished.
    """
    folder = resume_folder(s.args.resume, s.out / "checkpoints", s.say)
    if (folder / CHECKPOINT_FILE).is_file() != (t.stage == "off"):
        by = "without the DeepSpeed engine (--zero-stage off)" if t.stage != "off" else "by the DeepSpeed engine"
        raise SystemExit(f"--resume: {folder} was written {by}: resume with the --zero-stage it was trained with")
    t.engine.load_checkpoint(str(folder.parent), tag=folder.name)
    state, rng = checkpoint.load_state(folder, s.rank)
    if state.epoch >= s.args.epochs and finished(s.out, state):
        s.say(f"{s.out} finished at step {state.step} ({state.epoch} epochs; {s.out / 'results.json'}): nothing to do")
        return None
    for name, count in state.images.items() if s.rank == 0 else ():  # the run's counts; the other ranks count anew
        setattr(s.stats, name, count)
    if s.rank == 0:
        checkpoint.cut_log(s.out / "metrics.jsonl", state.metrics_bytes)  # records logged after it come again
        if state.best_step and exported_step(s.out / EXPORT) != state.best_step:
            export_best(s, t, state)  # the run stopped between the checkpoint and its export
    best = f"best dev F1 {state.best_f1 * 100:.2f} (epoch {state.best_epoch})" if state.best_step else "no dev yet"
    s.say(f"resumed from {folder}: step {state.step}, epoch {state.epoch} done + {state.batch} batches; {best}")
    return state, rng


def start(s: Session, t: Training) -> tuple[TrainState, GuardedSteps] | None:
    """Begin the run, or continue it from the checkpoint ``--resume`` names, with every generator where it was.

    Returns:
        (the run's state, the step driver with its SIGTERM catcher), or None when the resumed run had finished.
    """
    state, rng = TrainState(), None
    if s.args.resume:
        resumed = resume(s, t)
        if resumed is None:
            return None
        state, rng = resumed
    if s.rank == 0:
        checkpoint.clear_staging(s.out / "checkpoints")
        recorded = read_record(s.out) if s.args.resume else None
        if recorded:
            warn_if_data_changed(s, recorded, "the run was started on")
        write_record(s.out, run_record(s.args, s.choices, device_info(s.device, s.world), s.data))
    deepspeed.comm.barrier()
    steps = GuardedSteps(t.engine, s.args.grad_accum, checkpoint.StopRequest())
    if rng is not None:  # last: setting up the resumed run drew from the generators
        checkpoint.set_rng_state(rng)
    return state, steps


def train_epoch(s: Session, t: Training, state: TrainState, epoch: int, steps: GuardedSteps) -> dict:
    """Train epoch ``epoch`` from batch ``state.batch`` on: a step record per optimizer step, checkpoints every
    ``--save-every`` steps; SIGTERM checkpoints the step and exits with 143; ``--max-bad-steps`` non-finite steps in
    a row stop the run (under fp16, a step DeepSpeed's loss scaler skips for overflowing gradients of a finite loss
    is logged with ``loss_scale_overflow`` and not counted there: the scaler lowers the scale and goes on).

    Returns:
        {"seconds", "posts", "flops"} of this process's share of the epoch (the posts of all ranks, counted; FLOPs
        estimated as this rank's times the ranks).
    """
    args, loader, world = s.args, t.train_loader, s.world
    metrics, ckpt_dir = s.out / "metrics.jsonl", s.out / "checkpoints"
    set_epoch(loader.loader, epoch, skip=state.batch)
    t.engine.train()
    start, seen, flops = time.perf_counter(), 0, 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", disable=not s.progress, initial=state.batch)
    for batch in bar:
        first = state.batch // args.grad_accum * args.grad_accum  # the step's first micro-batch in the epoch
        size = min(args.grad_accum, len(loader) - first)  # the epoch's last step may take fewer
        boundary = state.batch + 1 == first + size
        steps.begin(boundary)
        flops += step_flops(t.model, batch.host) * world if t.peak else 0.0  # CPU tensors: no device sync
        if args.train_f1:  # the authors' habit: Viterbi on every training batch (costs a decode and a sync)
            loss, tags = t.engine(batch.tensors, decode=True)
            gold = [s.posts["train"][i].labels for i in batch.host["index"].tolist()]
            state.train_pred += word_tags(tags.cpu(), batch.host["first_piece"], [len(g) for g in gold],
                                          t.model.config.labels)  # fmt: skip
            state.train_gold += gold
        else:
            loss = t.engine(batch.tensors)
        done = steps.backward(loss, size, boundary, posts=batch.host["input_ids"].shape[0])
        state.batch += 1
        if done is None:  # inside an accumulation: checkpoints and records are per optimizer step
            continue
        value, applied = done  # value: the mean loss over all ranks' posts
        seen += steps.posts  # the step's posts on all ranks
        state.step += 1
        overflow = not applied and t.precision == "fp16" and math.isfinite(value)  # the loss scale is lowered
        if applied:
            state.bad_steps, state.epoch_steps = 0, state.epoch_steps + 1
            state.epoch_loss += value
        elif overflow:
            state.skipped_steps += 1
        else:
            state.bad_steps, state.skipped_steps = state.bad_steps + 1, state.skipped_steps + 1
            s.say(f"warning: step {state.step}: non-finite loss or gradients ({value}): skipped "
                  f"({state.bad_steps} in a row, {state.skipped_steps} in the run)")  # fmt: skip
        if s.rank == 0:
            record = step_record(state, epoch, value, applied, t.schedule.get_last_lr())
            append_jsonl(metrics, dict(record, loss_scale_overflow=True) if overflow else record)
        if state.bad_steps >= args.max_bad_steps:
            newest = checkpoint.newest_complete(ckpt_dir, s.say)
            raise SystemExit(
                f"stopped: {state.bad_steps} non-finite steps in a row (steps {state.step - state.bad_steps + 1}"
                f"-{state.step}, --max-bad-steps {args.max_bad_steps}); the last checkpoint, {newest}, is intact: "
                "--resume from it with a lower --lr, or check the data of these steps"
            )
        stopping = steps.stopping  # SIGTERM on any rank (agreed in the step's all-reduce): checkpoint, then exit
        if stopping or args.save_every and state.step % args.save_every == 0 and state.batch < len(loader):
            save(s, t, state)
        if stopping:
            s.say(f"SIGTERM: checkpoint {ckpt_dir / tag_of(state.step)} written; --resume continues from it")
            raise SystemExit(143)
        if state.step % POSTFIX_EVERY == 0:
            elapsed = time.perf_counter() - start
            rates = {"loss": f"{value:.3f}", "posts_per_s": f"{seen / elapsed:.1f}"}
            if t.peak:
                rates["mfu"] = f"{flops / elapsed / (t.peak * world):.1%}"
            bar.set_postfix(rates)
    return {"seconds": time.perf_counter() - start, "posts": seen, "flops": flops}


def end_epoch(s: Session, t: Training, state: TrainState, epoch: int, work: dict) -> dict:
    """Decode the dev set, log the epoch's record, checkpoint, and export the model when the dev F1 improved.

    Args:
        work: :func:`train_epoch`'s return.

    Returns:
        The epoch's record (as appended to ``metrics.jsonl``).
    """
    args, seconds = s.args, work["seconds"]
    dev = evaluate(t.model, t.dev_loader, desc="dev", progress=s.progress)  # each rank decodes its shard
    images = summed_over_ranks(s.stats)
    better = dev["f1"] > state.best_f1 or args.recipe_settings.select_ties and dev["f1"] == state.best_f1
    if better:
        state.best_f1, state.best_epoch, state.best_step = dev["f1"], epoch, state.step
    record = {
        "epoch": epoch,
        "step": state.step,
        "train_loss": state.epoch_loss / max(1, state.epoch_steps),
        "train_seconds": seconds,
        "train_posts_per_s": work["posts"] / seconds,
        **({"train_f1": entity_scores(state.train_gold, state.train_pred)["f1"]} if args.train_f1 else {}),
        **({"mfu": work["flops"] / seconds / (t.peak * s.world)} if t.peak else {}),
        "dev_precision": dev["precision"],
        "dev_recall": dev["recall"],
        "dev_f1": dev["f1"],
        "dev_per_type": dev["per_type"],
        "skipped_steps": state.skipped_steps,
        "images": images.as_dict(),
    }
    if s.rank == 0:
        append_jsonl(s.out / "metrics.jsonl", record)
    state.epoch, state.batch, state.epoch_loss, state.epoch_steps = epoch, 0, 0.0, 0
    state.train_gold, state.train_pred = [], []
    save(s, t, state)
    if better and s.rank == 0:
        export_best(s, t, state, dev)
    s.say(
        f"epoch {epoch}: loss {record['train_loss']:.4f} ({seconds:.0f} s, {work['posts'] / seconds:.0f} posts/s)"
        + (f" train F1 {record['train_f1'] * 100:.2f}" if args.train_f1 else "")
        + f" dev {format_scores(dev)}"
        + (" *best*" if better else "")
    )
    s.say(images.summary())
    return record


def final_test(s: Session, state: TrainState) -> dict | None:
    """Score the exported best model on the test set (every rank loads it and decodes its shard); rank 0 writes
    ``results.json`` (and a final record), and the test and dev predictions of that model with their reports
    (OUTPUT/predictions/{test,val}.conll, ``*_report.*``).

    Returns:
        The results (None on other ranks).
    """
    out, metrics = s.out, s.out / "metrics.jsonl"
    deepspeed.comm.barrier()  # rank 0 has written the export
    model, *_ = load_exported(out / EXPORT, s.device)
    model.backend = s.args.backend
    test = predictions(s, model, "test", "test")
    predictions(s, model, "val", "dev")  # the dev set at the best epoch, to read beside the test set
    images = summed_over_ranks(s.stats)
    if s.rank != 0:
        return None
    result = {
        "best_epoch": state.best_epoch,
        "dev_f1": state.best_f1,
        "test_precision": test["precision"],
        "test_recall": test["recall"],
        "test_f1": test["f1"],
        "test_per_type": test["per_type"],
        "test_f1_by_images": {k: row["f1"] for k, row in test["by_images"].items()},
        "test_error_counts": test["error_counts"],
        "image_mode": s.args.image_mode,
        "seed": s.args.seed,
        "step": state.step,
        "skipped_steps": state.skipped_steps,
    }
    update_card(out / EXPORT, {"scores": {"test": {k: test[k] for k in ("precision", "recall", "f1")}}})
    append_jsonl(metrics, {"final": result})  # before results.json: a resume cuts it off and scores again
    checkpoint.write_atomically(out / "results.json", json.dumps(result, indent=2, sort_keys=True))
    s.say(f"best epoch {state.best_epoch} (dev F1 {state.best_f1 * 100:.2f}); test {format_scores(test)}")
    s.say(images.summary())
    s.say(f"exported {out / EXPORT}; metrics in {metrics}; predictions in {out / 'predictions'}")
    return result
