"""Training you can trust, end to end on CPU (fp32): a run killed with SIGKILL mid-epoch and resumed ends exactly as the
uninterrupted run (per-step losses, metrics, final weights), with either engine and with image-decoding threads; the
same seed gives the same metrics; non-finite steps are skipped, counted, and stop the run when they persist."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.subprocesses import child_env
from tpm_fast import checkpoint
from tpm_fast.data.synthetic import ensure_synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
# 12 steps an epoch, checkpoints every 5 steps and at epoch ends (steps 5, 10, 12, 15, 20, 24)
RUN = "--epochs 2 --batch-size 4 --limit 48 --save-every 5 --lr 3e-3 --head-lr 3e-3 --eval-batch-size 16"
# seed 2: a seed whose 24-step run finds entities (test F1 > 0: the metrics compared are not all 0; many seeds' runs
# this short find none)
RUN = [*RUN.split(), "--max-seq-length", "20", "--no-progress", "--seed", "2"]
TIMING = ("train_seconds", "train_posts_per_s")
# train.py with a model whose loss is NaN ("loss") or finite with NaN gradients ("grad") at the training steps of
# BAD_STEPS ("3:loss,7:grad", counted from 1)
INJECT_NAN = """
import os, sys, torch, train
from tpm_fast import model
bad, calls = dict(s.split(":") for s in os.environ["BAD_STEPS"].split(",")), [0]
forward = model.TPMMI.forward
class NanGrad(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * float("nan"))
def poisoned(self, *args, **kwargs):
    loss = forward(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        kind = bad.get(str(calls[0]))
        if kind:
            loss = loss * float("nan") if kind == "loss" else NanGrad.apply(loss)
    return loss
model.TPMMI.forward = poisoned
train.main(sys.argv[1:])
"""

# train.py whose image feed dies (an exception in its decoding thread) on the CRASH_AT-th batch it assembles
CRASH_FEED = """
import os, sys, train
from tpm_fast.data import feed
assemble, calls = feed.assemble, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["CRASH_AT"]):
        raise MemoryError("injected: the image-decoding thread died")
    return assemble(*args, **kwargs)
feed.assemble = dying
train.main(sys.argv[1:])
"""


def env() -> dict:
    """One compute thread whatever the image threads (the thread count changes a GEMM's rounding)."""
    return child_env(TPM_FAST_THREADS="1")


def train(out: Path, corpus: Path, *extra: str, code: str | None = None, check: bool = True, **env_extra):
    """Run train.py (or ``code`` with train.py's arguments) to completion; returns the finished process."""
    head = ["-c", code] if code else ["train.py"]
    cmd = [sys.executable, *head, "--data-dir", str(corpus), "--output-dir", str(out), *RUN, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **env_extra}, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def kill_after(out: Path, corpus: Path, step: int, *extra: str) -> None:
    """Start a run and SIGKILL it as soon as a checkpoint of at least ``step`` is on disk."""
    cmd = [sys.executable, "train.py", "--data-dir", str(corpus), "--output-dir", str(out), *RUN, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(checkpoint.step_of(p) >= step for p in checkpoint.checkpoints(out / "checkpoints")):
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-5000:]}"
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()


def test_sigterm_checkpoints_the_step_and_exits(corpus, reference, tmp_path):
    """SIGTERM mid-run: the run writes a checkpoint of the step it is at and exits with 143; --resume then ends as
    the uninterrupted run."""
    out = ["--output-dir", str(tmp_path)]
    cmd = [sys.executable, "train.py", "--data-dir", str(corpus), *out, *RUN, "--image-threads", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 300
    while not log.is_file() or len(log.read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate()[0]
    assert proc.returncode == 143, output[-5000:]
    last = records(tmp_path)[-1]["step"]
    assert 2 <= last < 24 and checkpoint.newest_complete(tmp_path / "checkpoints").name == f"step{last}"
    train(tmp_path, corpus, "--image-threads", "2", "--resume")
    assert_same_run(tmp_path, reference)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.checkpoint_weights(checkpoint.newest_complete(out / "checkpoints"))


def assert_same_run(out: Path, ref: Path) -> None:
    """Same per-step losses and learning rates, epoch metrics, test scores and final weights, bit for bit."""
    got, want = records(out), records(ref)
    assert [r for r in got if "loss" in r] == [r for r in want if "loss" in r]  # every step, once
    assert without_timing(got) == without_timing(want)
    assert json.loads((out / "results.json").read_text()) == json.loads((ref / "results.json").read_text())
    mine, theirs = final_weights(out), final_weights(ref)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    exported = load_file(out / "best_model" / "model.safetensors")
    for k, v in load_file(ref / "best_model" / "model.safetensors").items():
        assert torch.equal(exported[k], v), k


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("cache"), seed=2, n_train=48, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run, one rank without the DeepSpeed engine, one image-decoding thread."""
    out = tmp_path_factory.mktemp("reference")
    train(out, corpus, "--image-threads", "1")
    return out


def test_same_seed_same_metrics(corpus, reference, tmp_path):
    train(tmp_path, corpus, "--image-threads", "1")
    assert without_timing(records(tmp_path)) == without_timing(records(reference))
    assert len([r for r in records(tmp_path) if "loss" in r]) == 24
    assert json.loads((tmp_path / "results.json").read_text())["test_f1"] > 0  # it learns: scores can differ


@pytest.mark.parametrize("threads", ["0", "2"])
def test_sigkill_mid_epoch_then_resume_is_exact(corpus, reference, tmp_path, threads):
    """Killed after the mid-epoch checkpoint of step 15 (or later): --resume continues from the newest complete one
    (mid-epoch 2, after an epoch end). With a pool of threads decoding images the run is the same as without."""
    kill_after(tmp_path, corpus, 15, "--image-threads", threads)
    newest = checkpoint.newest_complete(tmp_path / "checkpoints")
    assert json.loads((newest / checkpoint.STATE_FILE).read_text())["batch"] > 0  # mid-epoch
    train(tmp_path, corpus, "--image-threads", threads, "--resume")
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_checkpoints_resume_exactly(corpus, tmp_path, stage):
    """The DeepSpeed engine (one rank): ZeRO-2 and ZeRO-3 checkpoints resume as exactly."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    train(ref, corpus, "--image-threads", "1", "--zero-stage", stage)
    kill_after(out, corpus, 15, "--image-threads", "1", "--zero-stage", stage)
    train(out, corpus, "--image-threads", "1", "--zero-stage", stage, "--resume")
    assert_same_run(out, ref)


def test_gradient_accumulation_steps_the_schedule_per_optimizer_step_and_resumes_exactly(corpus, tmp_path):
    """--grad-accum 2: 6 optimizer steps an epoch (12 micro-batches), the schedule's linear decay reaches 0 at the
    run's last optimizer step; killed after the checkpoint of step 10 (mid-epoch 2), resumed, the same run."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    train(ref, corpus, "--image-threads", "1", "--grad-accum", "2")
    steps = [r for r in records(ref) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and steps[-1]["lr"] == [0.0, 0.0]
    assert [r["step"] for r in records(ref) if "dev_f1" in r] == [6, 12]
    kill_after(out, corpus, 7, "--image-threads", "1", "--grad-accum", "2")
    train(out, corpus, "--image-threads", "1", "--grad-accum", "2", "--resume")
    assert_same_run(out, ref)


def test_resuming_a_finished_run_does_nothing(reference, corpus):
    before = (reference / "metrics.jsonl").read_text(), (reference / "results.json").read_text()
    proc = train(reference, corpus, "--image-threads", "1", "--resume")
    assert "nothing to do" in proc.stdout
    assert ((reference / "metrics.jsonl").read_text(), (reference / "results.json").read_text()) == before


def test_a_crash_before_the_export_and_the_test_is_made_good(reference, corpus, tmp_path):
    """Stopped after the last checkpoint, before the export and results.json were written: --resume exports the
    best model from its checkpoint and scores the test set once, as the uninterrupted run did."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "best_model")
    (out / "results.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:  # half a final record, written as the process died
        f.write('{"final": {"best_ep')
    train(out, corpus, "--image-threads", "1", "--resume")
    assert_same_run(out, reference)
    best = json.loads((out / "results.json").read_text())["best_epoch"]
    assert json.loads((out / "best_model" / "config.json").read_text())["training"]["step"] == 12 * best


def test_a_new_run_into_another_runs_folder_fails_early(reference, corpus):
    before = (reference / "metrics.jsonl").read_text()
    proc = train(reference, corpus, check=False)
    assert proc.returncode == 1 and "holds another run" in proc.stderr and "--resume" in proc.stderr
    assert (reference / "metrics.jsonl").read_text() == before


def test_nonfinite_steps_are_skipped_without_a_trace(corpus, reference, tmp_path):
    """NaN losses at steps 3-4 and NaN gradients (finite loss) at step 7: each skipped (weights, optimizer and
    schedule as before it), counted and logged; the run goes on."""
    proc = train(tmp_path, corpus, "--image-threads", "1", code=INJECT_NAN, BAD_STEPS="3:loss,4:loss,7:grad")
    steps, want = [r for r in records(tmp_path) if "loss" in r], [r for r in records(reference) if "loss" in r]
    assert [r["step"] for r in steps if r.get("skipped")] == [3, 4, 7] and steps[2]["loss"] is None
    assert proc.stdout.count("non-finite loss or gradients") == 3
    assert steps[:2] == want[:2]  # the same run up to the first skip
    assert steps[4]["lr"] == want[2]["lr"] and steps[7]["lr"] == want[4]["lr"]  # the schedule counts applied steps
    assert steps[6]["loss"] is not None  # the loss was finite, its gradients were not
    assert records(tmp_path)[-1]["final"]["skipped_steps"] == 3


def test_nonfinite_steps_in_a_row_stop_the_run(corpus, tmp_path):
    """Three NaN steps in a row after the checkpoint of step 5: the run stops with exit code 1, naming the steps; the
    checkpoint of step 5 stays complete, and nothing was saved after it."""
    proc = train(tmp_path, corpus, "--image-threads", "1", "--max-bad-steps", "3", code=INJECT_NAN,
                 BAD_STEPS="7:loss,8:grad,9:loss", check=False)  # fmt: skip
    assert proc.returncode == 1 and "3 non-finite steps in a row (steps 7-9" in proc.stderr
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["step5"]
    assert checkpoint.problem(tmp_path / "checkpoints" / "step5") is None
    assert [r["step"] for r in records(tmp_path) if r.get("skipped")] == [7, 8, 9]


def test_a_dying_image_thread_stops_the_run_and_resume_makes_it_good(corpus, reference, tmp_path):
    """The image feed's decoding thread raises at the 9th training batch (after the checkpoint of step 5): the error
    reaches the training loop, the run exits non-zero, the checkpoint of step 5 is intact, and --resume ends as the
    uninterrupted run."""
    proc = train(tmp_path, corpus, "--image-threads", "1", code=CRASH_FEED, check=False, CRASH_AT="9")
    assert proc.returncode != 0 and "injected: the image-decoding thread died" in proc.stderr
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["step5"]
    assert max(r["step"] for r in records(tmp_path) if "loss" in r) == 8
    train(tmp_path, corpus, "--image-threads", "1", "--resume")
    assert_same_run(tmp_path, reference)


def test_an_image_folder_gone_mid_run_is_counted_not_fatal(corpus, reference, tmp_path):
    """The image folder is moved away after the first steps: its images are counted as missing (empty slots) and
    the run finishes."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(corpus, data)
    cmd = [sys.executable, "train.py", "--data-dir", str(data), "--output-dir", str(out), *RUN, "--image-threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not log.is_file() or len(log.read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.005)
    (data / "images").rename(tmp_path / "elsewhere")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-5000:]

    def missing(run: Path) -> int:  # images counted missing by the end of the last epoch
        return [r for r in records(run) if "dev_f1" in r][-1]["images"]["missing"]

    assert missing(out) > missing(reference) + 50 and records(out)[-1]["final"]["test_f1"] >= 0
