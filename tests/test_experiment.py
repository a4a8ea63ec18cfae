"""Several seeds end to end (summary, resuming at seed granularity, a failing seed) and compare on real runs."""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocesses import child_env
from tpm_fast.data.synthetic import ensure_synthetic_corpus
from tpm_fast.experiment import compare, main, run_experiment, summarize
from tpm_fast.report import read_conll, write_conll
from tpm_fast.significance import micro_f1

ROOT = Path(__file__).resolve().parents[1]
# tests/test_train.py's SMALL, one epoch on 16 posts per split: seconds per seed
TINY = "--epochs 1 --limit 16 --batch-size 4 --lr 3e-3 --head-lr 3e-3 --eval-batch-size 16 --max-seq-length 20"
TINY = [*TINY.split(), "--no-progress", "--image-threads", "0"]


def experiment(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = child_env()
    cmd = [sys.executable, "-m", "tpm_fast.experiment", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("cache"), seed=1, n_train=96, n_val=24, n_test=24)


@pytest.fixture(scope="module")
def two_seeds(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "multi"
    experiment("--seeds", "2", "--first-seed", "3", "--output-dir", str(out), "--", "--data-dir", str(corpus), *TINY)
    return out


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_summary_equals_the_runs_results(two_seeds):
    summary = json.loads((two_seeds / "summary.json").read_text())
    assert summary["seeds"] == [3, 4] and [r["seed"] for r in summary["runs"]] == [3, 4]
    for row in summary["runs"]:
        result = results(two_seeds / f"seed{row['seed']}")
        assert row["seed"] == result["seed"] and row["best_epoch"] == result["best_epoch"] == 1
        assert (row["test_precision"], row["test_recall"], row["test_f1"]) == (
            result["test_precision"],
            result["test_recall"],
            result["test_f1"],
        )
        assert row["dev_f1"] == result["dev_f1"]
    for metric in ("dev_f1", "dev_precision", "test_f1", "test_recall"):
        values = [r[metric] for r in summary["runs"]]
        assert summary["mean"][metric] == pytest.approx(statistics.mean(values))
        assert summary["std"][metric] == pytest.approx(statistics.stdev(values))  # sample std (n - 1)
    table = (two_seeds / "summary.md").read_text()
    f1s = [results(two_seeds / f"seed{s}")["test_f1"] * 100 for s in (3, 4)]
    assert f"{statistics.mean(f1s):.2f} ± {statistics.stdev(f1s):.2f}" in table
    for k, f1 in results(two_seeds / "seed3")["test_f1_by_images"].items():
        if f1 is not None and results(two_seeds / "seed4")["test_f1_by_images"][k] is not None:
            values = [results(two_seeds / f"seed{s}")["test_f1_by_images"][k] for s in (3, 4)]
            assert summary["mean"][f"test_f1_images_{k}"] == pytest.approx(statistics.mean(values))
    assert "Test F1 by images in the post: " in table
    assert summary["train_args"][:2] == ["--data-dir", summary["train_args"][1]] and "--seed" not in table


FAKE_TRAIN = """import json, sys
from pathlib import Path
out, seed = Path(sys.argv[sys.argv.index("--output-dir") + 1]), int(sys.argv[sys.argv.index("--seed") + 1])
(out / "argv.json").write_text(json.dumps({"argv": sys.argv[1:], "found": sorted(p.name for p in out.iterdir())}))
(out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "dev_precision": 0.5, "dev_recall": 0.5, "dev_f1": 0.5}))
scores = {"test_precision": seed / 10, "test_recall": seed / 10, "test_f1": seed / 10}
(out / "results.json").write_text(json.dumps({"seed": seed, "best_epoch": 1, "dev_f1": 0.5, **scores}))
"""


def test_rerun_skips_finished_seeds_resumes_checkpointed_ones_and_restarts_the_rest(two_seeds, tmp_path):
    script, out = tmp_path / "train.py", tmp_path / "exp"
    script.write_text(FAKE_TRAIN)  # stands in for train.py: records how it was called
    shutil.copytree(two_seeds / "seed3", out / "seed1")  # finished
    shutil.copytree(two_seeds / "seed4", out / "seed2", ignore=shutil.ignore_patterns("results.json"))  # checkpointed
    (out / "seed3").mkdir()
    (out / "seed3" / "metrics.jsonl").write_text('{"step": 1}\n')  # stopped before its first checkpoint
    finished = (out / "seed1" / "results.json").read_text()
    proc = experiment("--seeds", "4", "--first-seed", "1", "--output-dir", str(out), "--train-script", str(script),
                      "--", "--epochs", "1")  # fmt: skip
    assert "seed 1: finished" in proc.stdout and (out / "seed1" / "results.json").read_text() == finished
    assert not (out / "seed1" / "argv.json").exists()
    calls = {s: json.loads((out / f"seed{s}" / "argv.json").read_text()) for s in (2, 3, 4)}
    assert calls[2]["argv"] == ["--epochs", "1", "--seed", "2", "--output-dir", str(out / "seed2"), "--resume"]
    assert "checkpoints" in calls[2]["found"] and "seed 2: resuming" in proc.stdout
    assert calls[3]["argv"] == ["--epochs", "1", "--seed", "3", "--output-dir", str(out / "seed3")]
    assert calls[3]["found"] == ["train.log"]  # the partial run's files were cleared before it started again
    assert "seed 3: " in proc.stdout and "stopped before its first checkpoint" in proc.stdout
    assert calls[4]["argv"] == ["--epochs", "1", "--seed", "4", "--output-dir", str(out / "seed4")]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [3, 2, 3, 4]  # seed1 is a copy of the real seed 3
    assert summary["mean"]["test_f1"] == pytest.approx(statistics.mean([results(two_seeds / "seed3")["test_f1"],
                                                                        0.2, 0.3, 0.4]))  # fmt: skip


def test_real_resume_of_a_seed_stopped_before_its_test(two_seeds, corpus, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(two_seeds, out)
    (out / "seed4" / "results.json").unlink()  # stopped after its last checkpoint, before the final test
    proc = experiment("--seeds", "2", "--first-seed", "3", "--output-dir", str(out), "--", "--data-dir", str(corpus),
                      *TINY)  # fmt: skip
    assert "seed 3: finished" in proc.stdout and "seed 4: resuming" in proc.stdout
    assert "resumed from" in (out / "seed4" / "train.log").read_text()
    assert results(out / "seed4") == results(two_seeds / "seed4")  # same checkpoint, same test score
    assert (out / "summary.json").read_text().replace(str(out), "") == (two_seeds / "summary.json").read_text().replace(
        str(two_seeds), ""
    )


def test_failing_seed_stops_with_its_error(tmp_path):
    script = tmp_path / "train.py"  # fails like train.py on bad data: its error as the last line, exit code 1
    script.write_text("import sys\nprint('epoch 1: ...')\nsys.exit('error: data.txt:3: unknown label')\n")
    out = tmp_path / "x"
    proc = experiment("--seeds", "2", "--output-dir", str(out), "--train-script", str(script), "--", "--limit", "4",
                      check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "seed 42 failed (exit code 1): error: data.txt:3: unknown label" in proc.stderr
    assert "seed 43" not in proc.stdout + proc.stderr and not (out / "seed43").exists()
    assert "epoch 1: ..." in proc.stdout and "unknown label" in (out / "seed42" / "train.log").read_text()


def test_experiment_refuses_other_arguments_on_the_same_folder(two_seeds):
    with pytest.raises(SystemExit, match="started with other train.py arguments"):
        run_experiment(two_seeds, [3], ["--epochs", "2"])
    with pytest.raises(SystemExit, match="sets --seed, --output-dir and --resume itself"):
        run_experiment(two_seeds, [3], ["--seed", "1"])
    with pytest.raises(SystemExit, match="no finished seed"):
        summarize(two_seeds / "seed3")


def test_compare_two_real_runs(two_seeds):
    a, b = two_seeds / "seed3", two_seeds / "seed4"
    tests = compare(a, b, samples=2000)
    (label, result), = tests.items()  # fmt: skip
    assert label == "seeds 3/4" and result.posts == 16
    assert result.f1_a == pytest.approx(results(a)["test_f1"]) and result.f1_b == pytest.approx(results(b)["test_f1"])
    assert 1 / 2001 <= result.p_value <= 1
    # an experiment against itself: pairs seed by seed plus pooled, and nothing differs
    itself = compare(two_seeds, two_seeds, samples=500)
    assert list(itself) == ["seed 3", "seed 4", "pooled"]
    assert all(r.p_value == 1.0 and r.difference == 0 for r in itself.values()) and itself["pooled"].posts == 32
    pooled = sum(micro_f1_counts(two_seeds / f"seed{s}") for s in (3, 4))
    assert itself["pooled"].f1_a == pytest.approx(float(micro_f1(pooled)))
    # a run folder against an experiment: paired with the experiment's run of its seed
    assert list(compare(b, two_seeds, samples=100)) == ["seed 4"]


def test_compare_command_line(two_seeds, capsys):
    main(["compare", str(two_seeds), str(two_seeds / "seed4"), "--samples", "300", "--seed", "1"])
    out = capsys.readouterr().out
    f1 = results(two_seeds / "seed4")["test_f1"] * 100
    assert f"seed 4         16  {f1:6.2f}  {f1:6.2f}   +0.00   1.0000" in out
    assert "R=300, two-sided" in out and "pooled" not in out


def micro_f1_counts(run: Path):
    from tpm_fast.report import post_counts

    return post_counts(read_conll(run / "predictions" / "test.conll")).sum(0)


def test_compare_refuses_different_gold(two_seeds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_seeds / "seed4", other)
    posts = read_conll(other / "predictions" / "test.conll")
    posts[5].gold = ["B-PER" if t == "O" else "O" for t in posts[5].gold]
    write_conll(other / "predictions" / "test.conll", posts)
    with pytest.raises(SystemExit, match=f"post 6 \\(id {posts[5].id}: its gold tags differ\\); not the same gold"):
        compare(two_seeds / "seed3", other)
    with pytest.raises(SystemExit, match="neither a run folder"):
        compare(tmp_path, other)


def test_runs_write_predictions_and_eval_only_writes_the_same(two_seeds, corpus, tmp_path):
    run = two_seeds / "seed3"
    result, report = results(run), json.loads((run / "predictions" / "test_report.json").read_text())
    assert result["test_f1"] == report["f1"] and result["test_per_type"] == report["per_type"]
    assert result["test_f1_by_images"] == {k: row["f1"] for k, row in report["by_images"].items()}
    assert result["test_error_counts"] == report["error_counts"]
    assert len(read_conll(run / "predictions" / "val.conll")) == 16  # the dev set of the best model, too
    out = tmp_path / "eval"
    cmd = ["train.py", "--data-dir", str(corpus), "--limit", "16", "--eval-only", "--checkpoint",
           str(run / "best_model"), "--write-predictions", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("test.conll", "val.conll", "test_report.txt"):
        assert (out / "predictions" / name).read_text() != ""
        if name.endswith(".conll"):
            assert (out / "predictions" / name).read_text() == (run / "predictions" / name).read_text()
    assert f"test: P={result['test_precision'] * 100:.2f}" in proc.stdout
