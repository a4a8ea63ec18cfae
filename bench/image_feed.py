"""Training epochs of the embedded default with each image feed, interleaved in one process.

Separate ``train.py`` runs on a shared 2-core machine differ by 10-30 % from one minute to the next, more than the
feeds differ. This script builds the embedded default's model once and trains epoch after epoch, switching the feed
and the compute threads before each epoch, so every configuration sees the same machine state in every round:

- ``pil``: the default without a cache (on 2 cores: one PIL thread decoding 2 batches ahead, 1 compute thread);
- ``cache_ahead``: the cache read the same way (``--image-threads 1``);
- ``cache``: the cache's default (on 2 cores: batches assembled in the step's thread, 2 compute threads).

Each configuration's threads and prefetch come from ``train.py``'s own rules (:mod:`tpm_fast.runtime`).

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from tpm_fast import session, trainer  # noqa: E402
from tpm_fast.data.feed import PILImages  # noqa: E402
from tpm_fast.engine import set_epoch  # noqa: E402
from tpm_fast.runtime import choose_image_threads, configure_threads, cpu_cores, feed_prefetch  # noqa: E402


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
        feed = t.train_loader
        pil_threads, _ = choose_image_threads(None, s.image_mode, s.device, "pil")
        configs = {  # name: (source, image threads as train.py chooses them)
            "pil": (PILImages(s.spec, pil_threads), pil_threads),
            "cache_ahead": (s.source, 1),
            "cache": (s.source, choose_image_threads(None, s.image_mode, s.device, "cache")[0]),
        }
        rates: dict[str, list[float]] = {name: [] for name in configs}
        t.engine.train()
        epoch = 0
        for round_ in range(args.rounds + 1):
            for name, (source, image_threads) in configs.items():
                epoch += 1
                threads, _ = configure_threads(image_threads, s.device)  # sets torch's intra-op threads
                feed.source, feed.prefetch = source, feed_prefetch(image_threads, threads, s.device)
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
    print(f"\n{cpu_cores()} cores; posts/s, median over {args.rounds} rounds; ratio to pil paired by round")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates["pil"], strict=True)]
        print(f"{name}: {statistics.median(values):.1f} posts/s, {statistics.median(ratios):.2f}x pil "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
