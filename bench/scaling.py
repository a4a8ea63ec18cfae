"""Data parallel and ZeRO 1/2/3 on several ranks: same training, posts/s of each (``deepspeed --num_gpus N``).

For each ZeRO stage (0 = DeepSpeed's plain data parallel) trains the embedded default with ``deepspeed --num_gpus N
train.py --zero-stage S`` (CPU ranks without a GPU), and one rank without the engine as the reference. Prints a
markdown table: posts/s (all ranks, mean over epochs), the per-epoch training loss, dev F1, and the largest
difference of the final weights from stage 0's (the stages compute the same update, so they must agree to fp32
rounding). The one-rank run sees the same posts per step only when its ``--batch-size`` is N times larger; it is
the speed reference, not part of the equality check.

    python bench/scaling.py --ranks 2 --out bench/results/scaling-2ranks.json -- --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tpm_fast.checkpoint import checkpoint_weights, newest_complete

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, ranks: int, stage: str, extra: list[str]) -> dict:
    launcher = (
        [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks)] if ranks > 1 else [sys.executable]
    )
    cmd = [*launcher, "train.py", "--output-dir", str(out), "--no-progress", "--zero-stage", stage, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "dev_f1" in r]  # the epoch records (step records have a loss)
    return {
        "ranks": ranks,
        "stage": stage,
        "posts_per_s": sum(r["train_posts_per_s"] for r in epochs) / len(epochs),
        "train_loss": [round(r["train_loss"], 5) for r in epochs],
        "dev_f1": epochs[-1]["dev_f1"],
    }


def final_weights(ckpt_dir: Path) -> dict:
    """fp32 weights of the newest checkpoint, whichever engine wrote it."""
    return checkpoint_weights(newest_complete(ckpt_dir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=["0", "1", "2", "3"])
    p.add_argument("--out", type=Path)
    p.add_argument("extra", nargs="*", help="more train.py arguments (after --)")
    args = p.parse_args()
    rows, weights = [], {}
    with tempfile.TemporaryDirectory() as work:
        for stage in ["off", *args.stages]:
            ranks = 1 if stage == "off" else args.ranks
            out = Path(work) / f"stage-{stage}"
            rows.append(train(out, ranks, stage, args.extra))
            weights[stage] = final_weights(out / "checkpoints")
            print(json.dumps(rows[-1]), flush=True)
    base = weights[args.stages[0]]
    for row in rows:
        w = weights[row["stage"]]
        row["max_weight_diff_vs_stage0"] = max(float((w[k] - base[k]).detach().abs().max()) for k in base if k in w)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| ranks | engine | posts/s | train loss per epoch | dev F1 | max weight diff vs ZeRO-0 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        engine = "none (plain loop)" if r["stage"] == "off" else f"ZeRO-{r['stage']}"
        print(f"| {r['ranks']} | {engine} | {r['posts_per_s']:.0f} | {r['train_loss']} | {r['dev_f1'] * 100:.2f} "
              f"| {r['max_weight_diff_vs_stage0']:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
