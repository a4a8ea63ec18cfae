"""Speed costs no accuracy: the fast default configuration against the reference configuration, several seeds.

Runs ``train.py`` on the embedded default corpus for each seed in two configurations and prints a markdown table of
best dev F1, test F1 and training posts/s (mean over epochs), with the mean of each column:

- ``reference``: what ``train.py`` ran before the speed work: DeepSpeed ZeRO-1 engine on one rank, fp32, random
  batches, for-each AdamW, one DataLoader worker and 2 compute threads (``TPM_FAST_THREADS=2``), PyTorch reference
  kernels;
- ``fast``: today's defaults (no engine on one rank, fused AdamW, threads and workers chosen for the machine,
  length-bucketed batches and bf16 where they pay, on the embedded default neither does; the native C++ CPU
  kernels);
- ``fast_reference_kernels``: the same on the PyTorch reference kernels (``--backend reference``), what ``fast``
  ran before the native kernels: the pair shows what they change, seed by seed;
- ``bucketed``: the defaults with length-bucketed batches forced (``--bucket on``), to show what bucketing costs;
- ``cache``: the defaults with the decoded-image cache (``--image-cache``, built by the first run in the work folder),
  whose runs give the model every core (``fast`` keeps one for decoding).

    python bench/convergence.py --seeds 1 2 3 --out bench/results/convergence.json [-- extra train.py args]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "reference": (
        ["--zero-stage", "1", "--precision", "fp32", "--bucket", "off", "--no-fused-adamw", "--image-threads", "1"]
        + ["--backend", "reference"],
        {"TPM_FAST_THREADS": "2"},
    ),
    "fast": ([], {}),
    "fast_reference_kernels": (["--backend", "reference"], {}),
    "bucketed": (["--bucket", "on"], {}),
    "cache": (["--image-cache", "{work}/image-cache"], {}),
}


def run(config: str, seed: int, extra: list[str], work: Path) -> dict:
    args, env = CONFIGS[config]
    args = [a.format(work=work) for a in args]
    out = work / f"{config}-seed{seed}"
    cmd = [sys.executable, "train.py", "--seed", str(seed), "--output-dir", str(out), "--no-progress", *args, *extra]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | env
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return collect(config, seed, out)


def collect(config: str, seed: int, out: Path) -> dict:
    """The row of one finished ``train.py`` run from its OUTPUT/metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "dev_f1" in r]  # the epoch records (step records have a loss)
    final = next(r["final"] for r in records if "final" in r)
    return {
        "config": config,
        "seed": seed,
        "dev_f1": final["dev_f1"],
        "test_f1": final["test_f1"],
        "best_epoch": final["best_epoch"],
        "posts_per_s": sum(r["train_posts_per_s"] for r in epochs) / len(epochs),
        "train_seconds": sum(r["train_seconds"] for r in epochs),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| config | seed | best epoch | dev F1 | test F1 | train posts/s | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        for r in mine:
            lines.append(
                f"| {config} | {r['seed']} | {r['best_epoch']} | {r['dev_f1'] * 100:.2f} | {r['test_f1'] * 100:.2f} "
                f"| {r['posts_per_s']:.0f} | {r['train_seconds']:.0f} |"
            )
        if mine:
            mean = {
                k: sum(r[k] for r in mine) / len(mine) for k in ("dev_f1", "test_f1", "posts_per_s", "train_seconds")
            }
            lines.append(
                f"| **{config} mean** | | | **{mean['dev_f1'] * 100:.2f}** | **{mean['test_f1'] * 100:.2f}** "
                f"| **{mean['posts_per_s']:.0f}** | {mean['train_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("extra", nargs="*", help="more train.py arguments (after --)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for config in args.configs:
                rows.append(run(config, seed, args.extra, Path(work)))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
