"""Markdown tables of a pytest-benchmark results file: ``python bench/summarize.py bench/results/<device>.json``.

One table per suite (the test function), one row per group (mode, dtype, shape), one column per provider with
min / median milliseconds, then each provider's speed-up over the suite's baseline (min time over min time); the
train-step suite gets one table per group with a row per provider (mean step time, samples/s, memory, op counts).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

STEP_ORDER = ["authors", "dynamic", "fused", "bucketed", "fused_adamw", "compile", "bf16", "defaults", "plain"]
STEP_ORDER += ["zero0", "zero1", "zero2", "zero3"]
BASELINES = {"test_crf": "pytorch-crf", "test_prefix_attention": "hf_eager", "test_encoder_step": "hf_sdpa_cache"}
BASELINES.update(test_attention_host="sdpa_mask", test_crf_host="pytorch-crf", test_images="authors")


def train_step_tables(results: dict) -> str:
    """One table per train-step group: a row per provider with samples/s, speed-up, memory and op counts."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in results["benchmarks"]:
        if b["name"].startswith("test_train_step["):
            groups[b["group"]][b["extra_info"]["provider"]] = b
    out = []
    for group in sorted(groups, key=lambda g: (g.split("-")[2] != "text", int(g.rsplit("B", 1)[1]))):
        rows = dict(
            sorted(groups[group].items(), key=lambda kv: STEP_ORDER.index(kv[0]) if kv[0] in STEP_ORDER else 99)
        )
        base = rows.get("authors")
        out += [f"#### {group} (speed-up and op ratio against the authors' recipe; mean step time)", ""]
        out.append("| provider | step s | samples/s | speed-up | peak MB | kernel ops (this device) | ops vs authors | "
                   "GPU-path ops (Triton) | GPU-path vs authors | padding | MFU |")  # fmt: skip
        out.append("|" + "---|" * 11)
        for name, b in rows.items():
            e, mean = b["extra_info"], b["stats"]["mean"]
            speed = f"{base['stats']['mean'] / mean:.2f}x" if base else "-"
            ops = f"{e['kernel_ops'] / base['extra_info']['kernel_ops']:.2f}x" if base else "-"
            gpu = e.get("gpu_path_kernel_ops")
            gpu_ratio = f"{gpu / base['extra_info']['kernel_ops']:.2f}x" if base and gpu else "-"
            mfu = f"{e['mfu']:.1%}" if "mfu" in e else "-"
            out.append(
                f"| {name} | {mean:.3f} | {e.get('samples_per_s', '-')} | {speed} | {e['peak_mb']:.0f} | "
                f"{e['kernel_ops']} | {ops} | {gpu or '-'} | {gpu_ratio} | {e['padding']:.1%} | {mfu} |"
            )
        out.append("")
    return "\n".join(out)


def tables(results: dict) -> str:
    suites: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for b in results["benchmarks"]:
        if b["name"].startswith("test_train_step["):
            continue  # train_step_tables
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
    print(train_step_tables(results))


if __name__ == "__main__":
    main()
