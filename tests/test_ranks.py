"""One rank = two ranks, end to end on CPU: ``deepspeed --num_gpus 2 train.py --batch-size 4`` under ZeRO 1, 2 and 3
takes the steps of ``python train.py --batch-size 8`` (the same global batch): the same per-step losses (the mean over
both ranks' posts), final weights and image counts within fp32 tolerance; the posts of both ranks are counted; and
``--eval-only`` on two ranks (each decoding its shard, predictions gathered) gives exactly the one-rank scores and
predictions."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from tests.subprocesses import child_env
from tpm_fast import checkpoint
from tpm_fast.data.images import ImageSpec
from tpm_fast.data.synthetic import ensure_synthetic_corpus
from tpm_fast.engine import export_model
from tpm_fast.model import TPMConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(Path(sys.executable).parent / "deepspeed")
# 16 posts (divisible by 8: DistributedSampler does not repeat any), 2 steps of 8 posts; dev and test in 3 batches of
# at most 6 posts, dealt out to two ranks as 1 + 2 (one rank decodes a filler batch: ZeRO-3 must not hang)
RUN = "--epochs 1 --limit 16 --max-seq-length 20 --lr 3e-3 --head-lr 3e-3 --warmup-ratio 0 --eval-batch-size 6"
RUN = [*RUN.split(), "--precision", "fp32", "--image-threads", "0", "--no-progress"]
# train.py without dropout: each rank draws its own masks, so dropout would make one rank and two ranks differ
NO_DROPOUT = """
import sys
sys.path.insert(0, {root!r})
from torch import nn
from tpm_fast import model
init = model.TPMMI.__init__
def no_dropout(self, *args, **kwargs):
    init(self, *args, **kwargs)
    for m in self.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):  # its attention dropout is a float, not a module
            m.dropout = 0.0
model.TPMMI.__init__ = no_dropout
import train
train.main(sys.argv[1:])
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(*cmd: str) -> str:
    """Run ``cmd`` in the repository root with one compute thread per rank; fail with its output when it fails."""
    # one compute thread: the thread count changes a GEMM's rounding, which must be the same on one rank and on two
    env = child_env(TPM_FAST_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def two_ranks(script: Path, *args: str) -> str:
    return run(LAUNCHER, "--num_gpus", "2", "--master_port", free_port(), str(script), *args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("cache"), seed=3, n_train=16, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train_without_dropout.py"
    path.write_text(NO_DROPOUT.format(root=str(ROOT)))
    return path


@pytest.fixture(scope="module")
def one_rank(corpus, script, tmp_path_factory):
    """The one-rank run (no DeepSpeed engine, batch 8) of each bucketing mode, made on first use."""
    runs: dict[str, tuple[Path, str]] = {}

    def get(bucket: str) -> tuple[Path, str]:
        if bucket not in runs:
            out = tmp_path_factory.mktemp(f"one_rank_bucket_{bucket}")
            log = run(sys.executable, str(script), "--data-dir", str(corpus), "--output-dir", str(out), *RUN,
                      "--batch-size", "8", "--zero-stage", "off", "--bucket", bucket)  # fmt: skip
            runs[bucket] = out, log
        return runs[bucket]

    return get


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_images_line(log: str) -> str:
    return [line for line in log.splitlines() if line.startswith("images: ok=")][-1]


@pytest.mark.parametrize("stage,bucket", [("1", "off"), ("2", "on"), ("3", "off")])
def test_two_ranks_take_the_one_rank_steps(corpus, script, one_rank, tmp_path, stage, bucket):
    ref, ref_log = one_rank(bucket)
    log = two_ranks(script, "--data-dir", str(corpus), "--output-dir", str(tmp_path), *RUN, "--batch-size", "4",
                    "--zero-stage", stage, "--bucket", bucket)  # fmt: skip
    assert f"DeepSpeed ZeRO-{stage}" in log and "2 rank(s)" in log
    steps, want = [r for r in records(tmp_path) if "loss" in r], [r for r in records(ref) if "loss" in r]
    assert [(r["step"], r["lr"]) for r in steps] == [(r["step"], r["lr"]) for r in want] and len(steps) == 2
    for got, ref_step in zip(steps, want):  # the mean over both ranks' posts, not rank 0's
        assert got["loss"] == pytest.approx(ref_step["loss"], rel=1e-5)
    epoch, ref_epoch = (next(r for r in records(out) if "dev_f1" in r) for out in (tmp_path, ref))
    assert epoch["train_loss"] == pytest.approx(ref_epoch["train_loss"], rel=1e-5)
    assert epoch["train_posts_per_s"] * epoch["train_seconds"] == pytest.approx(16)  # both ranks' posts, counted
    assert epoch["images"] == ref_epoch["images"] and epoch["images"]["ok"] > 0  # train + dev, each image once
    assert last_images_line(log) == last_images_line(ref_log)  # with the test set, decoded by both ranks
    weights = checkpoint.checkpoint_weights(checkpoint.newest_complete(tmp_path / "checkpoints"))
    ref_weights = checkpoint.checkpoint_weights(checkpoint.newest_complete(ref / "checkpoints"))
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():  # two Adam steps of lr 3e-3 from the same start: a changed step shows
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_eval_only_on_two_ranks_scores_exactly_as_one(corpus, script, tmp_path):
    """A random model that predicts entities (scores > 0, so a post decoded twice, missed or out of order shows)."""
    tokenizer = BertTokenizer(vocab=str(corpus / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    model = build_model(TPMConfig(prefix_hidden=256, temporal_ffn=256), len(tokenizer))
    with torch.no_grad():
        model.emissions.bias[1:9] += 3.0  # B-/I- tags favoured over O
    export_model(model, model.state_dict(), tokenizer, ImageSpec(224), 20, tmp_path / "best_model")
    args = ["--eval-only", "--checkpoint", str(tmp_path / "best_model"), "--data-dir", str(corpus), *RUN]
    args += ["--write-predictions"]
    one = run(sys.executable, "train.py", *args, "--output-dir", str(tmp_path / "one"))
    two = two_ranks(script, *args, "--output-dir", str(tmp_path / "two"))

    def scores(log: str) -> list[str]:
        return [line for line in log.splitlines() if line.startswith(("val: ", "test: ", "images: ok="))]

    assert len(scores(one)) == 3 and scores(two) == scores(one)
    assert all("F1=0.00" not in line for line in scores(one)[:2])
    for name in ("val.conll", "test.conll"):  # every post once, in the data's order, with the same tags
        written = (tmp_path / "two" / "predictions" / name).read_text()
        assert written == (tmp_path / "one" / "predictions" / name).read_text() and written.count("\n\n") >= 15
