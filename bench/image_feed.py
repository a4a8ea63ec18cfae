"""Training epochs of the embedded default with each image feed, interleaved in one process.

Separate ``train.py`` runs on a shared 2-core machine differ by 10-30 % from one minute to the next, more than the
feeds differ. This script builds the embedded default's model once and trains epoch after epoch, switching the feed
and the compute threads before each epoch, so every configuration sees the same machine state in every round:

- ``pil``: the default without a cache: one PIL thread decoding 2 batches ahead, 1 compute thread;
- ``cache_ahead``: the cache read the same way (1 background thread, 1 compute thread; ``--image-threads 1``);
- ``cache``: the cache's default: batches assembled in the step's thread, 2 compute threads (every core).

The model keeps training across epochs (their cost does not depend on the weights); round 0 is a warm-up and is not
counted. Prints posts/s per epoch and each configuration's median ratio to ``pil``, paired by round.

    python bench/image_feed.py --rounds 5 [--cache DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from tpm_fast import session, trainer  # noqa: E402
from tpm_fast.data.feed import PILImages  # noqa: E402
from tpm_fast.engine import set_epoch  # noqa: E402
from tpm_fast.runtime import cpu_cores  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="counted rounds (after one warm-up round)")
    p.add_argument("--cache", help="decoded-image cache folder (default: a temporary one, built first)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cache = args.cache or str(Path(work) / "image-cache")
        run_args = train.parse_args(["--image-cache", cache, "--output-dir", str(Path(work) / "run"), "--no-progress"])
        s = session.prepare(run_args)  # builds the cache where it lacks images
        t = session.build_training(s)
        _, steps = trainer.start(s, t)
        feed, cores = t.train_loader, cpu_cores()
        configs = {  # name: (source, compute threads, batches ahead)
            "pil": (PILImages(s.spec, 1), cores - 1, 2),
            "cache_ahead": (s.source, cores - 1, 2),
            "cache": (s.source, cores, 0),
        }
        rates: dict[str, list[float]] = {name: [] for name in configs}
        t.engine.train()
        epoch = 0
        for round_ in range(args.rounds + 1):
            for name, (source, threads, ahead) in configs.items():
                epoch += 1
                feed.source, feed.prefetch = source, ahead
                torch.set_num_threads(threads)
                set_epoch(feed.loader, epoch)
                start, posts = time.perf_counter(), 0
                for batch in feed:
                    steps.begin(True)
                    steps.backward(t.engine(batch.tensors), 1, True, posts=batch.host["input_ids"].shape[0])
                    posts += batch.host["input_ids"].shape[0]
                rate = posts / (time.perf_counter() - start)
                if round_:
                    rates[name].append(rate)
                print(f"round {round_} {name}: {rate:.1f} posts/s{'' if round_ else ' (warm-up)'}", flush=True)
    print(f"\n{cores} cores; posts/s, median over {args.rounds} rounds; ratio to pil paired by round")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates["pil"], strict=True)]
        print(f"{name}: {statistics.median(values):.1f} posts/s, {statistics.median(ratios):.2f}x pil "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
