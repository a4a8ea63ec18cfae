"""train.py's steps one at a time (tpm_fast.session, tpm_fast.trainer), each in a child process of its own (one
rank starts torch.distributed, which the other tests' gloo ranks must not inherit)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocesses import child_env
from tpm_fast.checkpoint import checkpoints, problem, tag_of
from tpm_fast.data.synthetic import ensure_synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
ARGS = "--epochs 1 --batch-size 4 --eval-batch-size 8 --max-seq-length 20 --save-every 2 --image-threads 0".split()

STEPS = """
import json, sys
import train
from tpm_fast import session, trainer
args = train.parse_args(sys.argv[2:])
s = session.prepare(args)
t = session.build_training(s)
state, steps = trainer.start(s, t)
if sys.argv[1] == "sigterm":
    steps.stop.requested = True  # as the SIGTERM handler does: checkpoint after this step, then exit 143
work = trainer.train_epoch(s, t, state, 1, steps)
record = trainer.end_epoch(s, t, state, 1, work)
result = trainer.final_test(s, state)
print("RESULT " + json.dumps({"work": work, "record": record, "result": result, "best_step": state.best_step}))
"""


def run_steps(mode: str, corpus: Path, out: Path) -> subprocess.CompletedProcess:
    env = child_env()
    argv = [*ARGS, "--no-progress", "--data-dir", str(corpus), "--output-dir", str(out)]
    cmd = [sys.executable, "-c", STEPS, mode, *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("cache"), seed=3, n_train=16, n_val=8, n_test=8)


def test_epoch_evaluation_export_and_final_test_one_at_a_time(corpus, tmp_path):
    """train_epoch: 4 steps of 4 posts, a step record each, a checkpoint every 2 steps; end_epoch: the epoch record
    it returns is the one logged, the first epoch is the best and is exported; final_test: results.json."""
    proc = run_steps("train", corpus, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert got["work"]["posts"] == 16 and got["work"]["seconds"] > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged[:4]] == [1, 2, 3, 4] and all("loss" in r for r in logged[:4])
    assert logged[4] == json.loads(json.dumps(got["record"])) and got["record"]["step"] == 4
    assert got["best_step"] == 4 and (tmp_path / "best_model" / "model.safetensors").is_file()
    saved = checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == [tag_of(2), tag_of(4)] and not any(map(problem, saved))
    assert json.loads((tmp_path / "results.json").read_text()) == got["result"]
    assert got["result"]["dev_f1"] == got["record"]["dev_f1"] and got["result"]["step"] == 4


def test_train_epoch_stops_after_the_step_a_stop_was_asked_in(corpus, tmp_path):
    """A stop request (SIGTERM's flag) before the first step: that step is taken and checkpointed, then exit 143."""
    proc = run_steps("sigterm", corpus, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    saved = checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == [tag_of(1)] and problem(saved[0]) is None
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / "results.json").exists()
