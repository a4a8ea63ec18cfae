"""Markdown tables of a pytest-benchmark results file: ``python bench/summarize.py bench/results/<device>.json``.

One table per suite (the test function), one row per group (mode, dtype, shape), one column per provider with
min / median milliseconds, then each provider's speed-up over the suite's baseline (min time over min time).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BASELINES = {"test_crf": "pytorch-crf", "test_prefix_attention": "hf_eager", "test_encoder_step": "hf_sdpa_cache"}


def tables(results: dict) -> str:
    suites: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for b in results["benchmarks"]:
        suite = b["name"].split("[")[0]
        suites[suite][b["group"]][b["extra_info"]["provider"]] = b["stats"]
    out = []
    for suite, groups in suites.items():
        providers = list(dict.fromkeys(p for g in groups.values() for p in g))
        base = BASELINES.get(suite, providers[0])
        others = [p for p in providers if p != base]
        out += [f"### {suite} (baseline {base}; times min / median ms; speed-up = baseline min / provider min)", ""]
        out.append("| group | " + " | ".join(providers) + " | " + " | ".join(f"{p} speed-up" for p in others) + " |")
        out.append("|" + "---|" * (1 + len(providers) + len(others)))
        for group, stats in groups.items():
            times = [
                f"{s['min'] * 1e3:.2f} / {s['median'] * 1e3:.2f}" if (s := stats.get(p)) else "-" for p in providers
            ]
            ratios = [
                f"{stats[base]['min'] / stats[p]['min']:.2f}x" if base in stats and p in stats else "-" for p in others
            ]
            out.append(f"| {group} | " + " | ".join(times + ratios) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path, help="bench/results/<device>.json")
    path = p.parse_args().results
    results = json.loads(path.read_text())
    info = results["benchmarks"][0]["extra_info"] if results["benchmarks"] else {}
    print(f"Device `{results.get('device', path.stem)}`, torch {info.get('torch')}, {info.get('threads')} thread(s), "
          f"{results.get('datetime', '')[:10]}.\n")  # fmt: skip
    print(tables(results))


if __name__ == "__main__":
    main()
