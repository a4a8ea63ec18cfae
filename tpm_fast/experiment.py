"""Several seeds of one training command, their summary, and a paired significance test between two systems.

    python -m tpm_fast.experiment --seeds 5 --output-dir runs/multi -- --image-mode multi --epochs 15
    python -m tpm_fast.experiment --seeds 5 --output-dir runs/text -- --image-mode text --epochs 15
    python -m tpm_fast.experiment compare runs/multi runs/text

**Run** (the first form): runs ``train.py <train.py args> --seed S --output-dir DIR/seed<S>`` for S = first seed, ...,
first seed + seeds - 1, one after the other, each as a child process (``--launcher`` prefixes the command, e.g.
``"deepspeed --num_gpus 2"``; default: this Python); its output goes to the terminal and to DIR/seed<S>/train.log.
Resumable: a seed with a ``results.json`` is finished and skipped, one with a complete checkpoint continues with
``--resume``, one stopped before its first checkpoint starts again; a failing seed stops the experiment with its
error (run the same command again to go on). DIR/experiment.json keeps the train.py arguments; another command on
the same DIR is refused. At the end DIR/summary.json and DIR/summary.md hold each seed's dev P/R/F1 (the best
epoch's, from its ``metrics.jsonl``) and test P/R/F1 (``results.json``), and their mean and sample standard
deviation over the finished seeds (also of the test F1 per type and by images in the post).

**Compare** (``compare A B``): A and B are each a run folder (holding ``results.json``) or an experiment folder
(holding ``seed<S>/results.json``). The test reads each run's ``predictions/<split>.conll`` (written by every final
test of ``train.py``) and runs a paired approximate randomization of micro-F1 over posts
(:mod:`tpm_fast.significance`). Pairing: two run folders are paired with each other; otherwise runs are paired by
seed (the seeds both have; a run folder against an experiment pairs with the experiment's run of its seed), each
pair is tested on its own, and the pooled test takes every (seed, post) of the pairs as one unit (micro-F1 over all
of them; each unit's two predictions swapped independently). The gold of each pair (post ids and tags) must be the
same, else the comparison is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tpm_fast.report import TaggedPost, post_counts, read_conll
from tpm_fast.significance import RandomizationResult, paired_randomization

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_FILE = "experiment.json"
CONTROLLED = ("--seed", "--output-dir", "--resume", "--eval-only", "--checkpoint")
"""train.py arguments the experiment sets itself."""
METRICS = ("dev_precision", "dev_recall", "dev_f1", "test_precision", "test_recall", "test_f1")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- run several seeds ----------------------------------------------------------------------------------------------


def _check_train_args(train_args: list[str]) -> None:
    for arg in train_args:
        name = arg.split("=", 1)[0]
        if name in CONTROLLED:
            raise SystemExit(f"train.py argument {name}: the experiment sets --seed, --output-dir and --resume itself")


def _remember(folder: Path, train_args: list[str], launcher: list[str]) -> None:
    """Write DIR/experiment.json, or refuse when DIR was started with other train.py arguments."""
    path = folder / EXPERIMENT_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before["train_args"] != train_args:
            raise SystemExit(
                f"{folder} was started with other train.py arguments ({shlex.join(before['train_args'])}; now "
                f"{shlex.join(train_args)}): choose another --output-dir, or give the same arguments to resume it"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train_args": train_args, "launcher": launcher}, indent=2) + "\n")


def _run_logged(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run ``cmd``; its output goes to our stdout and is appended to ``log``. Returns (exit code, last line)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # the child picks its own rendezvous
    last = ""
    with open(log, "ab") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as p:
        for line in p.stdout:
            f.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if line.strip():
                last = line.decode("utf-8", "replace").strip().split("\r")[-1]
    return p.returncode, last


def run_seed(folder: Path, seed: int, train_args: list[str], launcher: list[str], script: Path) -> None:
    """Train one seed into ``folder`` (``DIR/seed<S>``), resuming it when it has a complete checkpoint.

    Raises:
        SystemExit: the training failed (exit code and its last output line).
    """
    from tpm_fast.checkpoint import newest_complete  # torch: only where a seed is trained

    cmd = [*launcher, str(script), *train_args, "--seed", str(seed), "--output-dir", str(folder)]
    if folder.is_dir():
        if newest_complete(folder / "checkpoints", warn=print) is not None:
            cmd.append("--resume")
            print(f"seed {seed}: resuming {folder}", flush=True)
        else:
            print(f"seed {seed}: {folder} stopped before its first checkpoint: starting it again", flush=True)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"seed {seed}: {shlex.join(cmd)}", flush=True)
    code, last = _run_logged(cmd, folder / "train.log")
    if code != 0:
        raise SystemExit(
            f"seed {seed} failed (exit code {code}): {last}\n(full output in {folder / 'train.log'}; run the same "
            "command again to resume the experiment)"
        )
    if not (folder / "results.json").is_file():
        raise SystemExit(f"seed {seed}: train.py ended without writing {folder / 'results.json'}")


def run_experiment(
    folder: Path, seeds: list[int], train_args: list[str], launcher: list[str] | None = None, script: Path | None = None
) -> dict:
    """Train every seed not finished yet, then write the summary (module docstring).

    Args:
        folder: the experiment folder DIR.
        seeds: the seeds, in order.
        train_args: train.py arguments (without --seed, --output-dir, --resume).
        launcher: command prefix (default: this Python).
        script: train.py (default: the one beside the package).

    Returns:
        The summary (:func:`summarize`).
    """
    _check_train_args(train_args)
    launcher = launcher or [sys.executable]
    script = script or ROOT / "train.py"
    if not script.is_file():
        raise SystemExit(f"{script}: no train.py there (pass --train-script)")
    _remember(folder, train_args, launcher)
    for seed in seeds:
        run = folder / f"seed{seed}"
        if (run / "results.json").is_file():
            print(f"seed {seed}: finished ({run / 'results.json'}): skipped", flush=True)
            continue
        run_seed(run, seed, train_args, launcher, script)
    return write_summary(folder)


# --- summary --------------------------------------------------------------------------------------------------------


def seed_runs(folder: Path) -> dict[int, Path]:
    """The finished runs of an experiment folder: seed -> ``DIR/seed<S>`` holding ``results.json``, by seed."""
    runs = {}
    for path in Path(folder).glob("seed*"):
        match = re.fullmatch(r"seed(-?\d+)", path.name)
        if match and (path / "results.json").is_file():
            runs[int(match.group(1))] = path
    return dict(sorted(runs.items()))


def run_row(run: Path) -> dict:
    """One run's numbers: seed, best epoch, dev P/R/F1 at the best epoch, test P/R/F1, test F1 per type and by
    images in the post (fractions).

    Raises:
        SystemExit: the best epoch has no record in the run's ``metrics.jsonl``.
    """
    result = json.loads((run / "results.json").read_text())
    dev = None
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if record.get("epoch") == result["best_epoch"] and "dev_f1" in record:
            dev = record  # the last one: a resume cuts the log back, so there is one
    if dev is None:
        raise SystemExit(f"{metrics}: no record of the best epoch ({result['best_epoch']}) named in results.json")
    row = {"seed": result["seed"], "best_epoch": result["best_epoch"]}
    row.update({k: dev[k] for k in ("dev_precision", "dev_recall", "dev_f1")})
    row.update({k: result[k] for k in ("test_precision", "test_recall", "test_f1")})
    row["test_per_type_f1"] = {k: v["f1-score"] for k, v in sorted(result.get("test_per_type", {}).items())}
    row["test_f1_by_images"] = result.get("test_f1_by_images", {})  # None for an image count without posts
    return row


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(folder: Path) -> dict:
    """The summary of an experiment folder's finished seeds.

    Returns:
        ``{"folder", "train_args", "seeds", "runs": [run_row ...], "mean": {metric: x}, "std": {metric: x or None}}``
        for the metrics dev/test precision/recall/f1, ``test_f1_<TYPE>`` and ``test_f1_images_<k>`` (image counts with
        test posts in every run); std is the sample standard deviation
        (n - 1), None for one seed.

    Raises:
        SystemExit: no finished seed.
    """
    runs = seed_runs(folder)
    if not runs:
        raise SystemExit(f"{folder}: no finished seed (seed<S>/results.json)")
    rows = [run_row(path) for path in runs.values()]
    columns = {m: [r[m] for r in rows] for m in METRICS}
    for kind in sorted({k for r in rows for k in r["test_per_type_f1"]}):
        columns[f"test_f1_{kind}"] = [r["test_per_type_f1"].get(kind, 0.0) for r in rows]
    for k in sorted({k for r in rows for k in r["test_f1_by_images"]}):
        values = [r["test_f1_by_images"].get(k) for r in rows]
        if all(v is not None for v in values):
            columns[f"test_f1_images_{k}"] = values
    stats = {m: _mean_std(v) for m, v in columns.items()}
    experiment = Path(folder) / EXPERIMENT_FILE
    train_args = json.loads(experiment.read_text())["train_args"] if experiment.is_file() else None
    return {
        "folder": str(folder),
        "train_args": train_args,
        "seeds": list(runs),
        "runs": rows,
        "mean": {m: s[0] for m, s in stats.items()},
        "std": {m: s[1] for m, s in stats.items()},
    }


def _pm(mean: float, std: float | None) -> str:
    return f"{mean * 100:.2f}" if std is None else f"{mean * 100:.2f} ± {std * 100:.2f}"


def format_summary(summary: dict) -> str:
    """The summary as a Markdown table (percent): one row per seed, then mean ± sample std."""
    head = "| seed | best epoch | dev P | dev R | dev F1 | test P | test R | test F1 |"
    lines = [f"# {summary['folder']}", ""]
    if summary["train_args"] is not None:
        lines += [f"train.py {shlex.join(summary['train_args'])} (seeds {summary['seeds']})", ""]
    lines += [head, "|" + "---|" * 8]
    for r in summary["runs"]:
        lines.append(f"| {r['seed']} | {r['best_epoch']} | " + " | ".join(f"{r[m] * 100:.2f}" for m in METRICS) + " |")
    mean, std = summary["mean"], summary["std"]
    lines.append(
        f"| mean ± std ({len(summary['runs'])}) | | " + " | ".join(_pm(mean[m], std[m]) for m in METRICS) + " |"
    )
    types = [m for m in mean if m.startswith("test_f1_") and not m.startswith("test_f1_images_")]
    if types:
        lines += ["", "Test F1 per type: " + ", ".join(f"{m[8:]} {_pm(mean[m], std[m])}" for m in types)]
    images = [m for m in mean if m.startswith("test_f1_images_")]
    if images:
        lines += [
            "",
            "Test F1 by images in the post: " + ", ".join(f"{m[15:]}: {_pm(mean[m], std[m])}" for m in images),
        ]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path) -> dict:
    """Write DIR/summary.json and DIR/summary.md; returns the summary."""
    summary = summarize(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(format_summary(summary))
    print(format_summary(summary), end="", flush=True)
    return summary


# --- compare two systems --------------------------------------------------------------------------------------------


def runs_of(path: Path) -> tuple[dict[int, Path], bool]:
    """(seed -> run folder, whether ``path`` is a single run folder).

    Raises:
        SystemExit: ``path`` is neither a run folder nor an experiment folder.
    """
    path = Path(path)
    if (path / "results.json").is_file():
        return {json.loads((path / "results.json").read_text())["seed"]: path}, True
    runs = seed_runs(path)
    if not runs:
        raise SystemExit(f"{path}: neither a run folder (results.json) nor an experiment folder (seed<S>/results.json)")
    return runs, False


def _predictions(run: Path, split: str) -> list[TaggedPost]:
    path = run / "predictions" / f"{split}.conll"
    if not path.is_file():
        raise SystemExit(
            f"{path}: no predictions (runs write them at their final test; for an older run: train.py --eval-only "
            f"--checkpoint {run / 'best_model'} (best_model.pt before) --write-predictions --output-dir {run} and its "
            "data arguments)"
        )
    return read_conll(path)


def _same_gold(a: list[TaggedPost], b: list[TaggedPost], where_a: Path, where_b: Path) -> None:
    if len(a) != len(b):
        raise SystemExit(f"cannot pair {where_a} ({len(a)} posts) with {where_b} ({len(b)} posts): not the same posts")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.id != y.id or x.gold != y.gold:
            what = f"ids {x.id} and {y.id}" if x.id != y.id else f"id {x.id}: its gold tags differ"
            raise SystemExit(f"cannot pair {where_a} with {where_b}: post {i + 1} ({what}); not the same gold")


def pairs_of(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    """The paired runs of A and B (module docstring): (label, run of A, run of B).

    Raises:
        SystemExit: no pairing (no common seed).
    """
    runs_a, single_a = runs_of(a)
    runs_b, single_b = runs_of(b)
    if single_a and single_b:
        (seed_a, run_a), (seed_b, run_b) = next(iter(runs_a.items())), next(iter(runs_b.items()))
        return [(f"seed {seed_a}" if seed_a == seed_b else f"seeds {seed_a}/{seed_b}", run_a, run_b)]
    common = [s for s in runs_a if s in runs_b]
    if not common:
        raise SystemExit(f"{a} (seeds {list(runs_a)}) and {b} (seeds {list(runs_b)}) have no seed in common to pair")
    return [(f"seed {s}", runs_a[s], runs_b[s]) for s in common]


def compare(
    a: Path, b: Path, split: str = "test", samples: int = 10000, seed: int = 0
) -> dict[str, RandomizationResult]:
    """Paired randomization tests of A against B on ``split``: each pair of runs, and pooled over the pairs.

    Returns:
        label -> :class:`~tpm_fast.significance.RandomizationResult`; ``"pooled"`` last when there are several pairs.
    """
    results, counts_a, counts_b = {}, [], []
    for label, run_a, run_b in pairs_of(a, b):
        pred_a, pred_b = _predictions(run_a, split), _predictions(run_b, split)
        _same_gold(pred_a, pred_b, run_a, run_b)
        counts_a.append(post_counts(pred_a))
        counts_b.append(post_counts(pred_b))
        results[label] = paired_randomization(counts_a[-1], counts_b[-1], samples, seed)
    if len(results) > 1:
        results["pooled"] = paired_randomization(np.concatenate(counts_a), np.concatenate(counts_b), samples, seed)
    return results


def format_comparison(a: Path, b: Path, results: dict[str, RandomizationResult]) -> str:
    """A table: per pair (and pooled) F1 of A and B, their difference and p; ``*`` marks p < 0.05."""
    lines = [f"A = {a}", f"B = {b}", "", "pair        posts  F1 A    F1 B    A - B    p"]
    for label, r in results.items():
        mark = " *" if r.p_value < 0.05 else ""
        lines.append(f"{label:<11} {r.posts:>5}  {r.f1_a * 100:6.2f}  {r.f1_b * 100:6.2f}  "
                     f"{r.difference * 100:+6.2f}   {r.p_value:.4f}{mark}")  # fmt: skip
    r = next(iter(results.values()))
    lines.append(f"(paired approximate randomization, R={r.samples}, two-sided; * p < 0.05)")
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------------------------------------


def _run_main(argv: list[str]) -> None:
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="python -m tpm_fast.experiment",
        usage="%(prog)s --seeds N [--first-seed S] --output-dir DIR -- <train.py args>\n"
        "       %(prog)s compare A B [--samples R] [--seed S] [--split test]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--first-seed", type=int, default=42, help="seeds are S, S+1, ... (default 42, train.py's)")
    p.add_argument("--output-dir", required=True, help="experiment folder: DIR/seed<S> per seed, DIR/summary.*")
    p.add_argument("--launcher", default="", help='command before train.py (default: this Python), e.g. "deepspeed"')
    p.add_argument("--train-script", type=Path, default=ROOT / "train.py", help="train.py to run")
    args = p.parse_args(ours)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    launcher = shlex.split(args.launcher) if args.launcher else None
    run_experiment(Path(args.output_dir), seeds, train_args, launcher, args.train_script)


def _compare_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tpm_fast.experiment compare",
        description="Paired approximate randomization of micro-F1 over posts between two runs or experiments "
        "(pairing: see python -m tpm_fast.experiment --help).",
    )
    p.add_argument("a", type=Path, help="run folder or experiment folder")
    p.add_argument("b", type=Path, help="run folder or experiment folder")
    p.add_argument("--samples", type=int, default=10000, help="randomization samples R")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomization")
    p.add_argument("--split", default="test", choices=["test", "val"], help="predictions/<split>.conll to compare")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    print(format_comparison(args.a, args.b, compare(args.a, args.b, args.split, args.samples, args.seed)), end="")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        _compare_main(argv[1:])
    else:
        _run_main(argv)


if __name__ == "__main__":
    main()
