"""The DeepSpeed config of a run (tpm_fast.config): from flags, or from a --deepspeed_config file whose settings become
the run's; contradictions refused before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import train
from tpm_fast.config import BASE, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def parse(tmp_path, config: dict | None, *flags: str):
    argv = list(flags)
    if config is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        argv += ["--deepspeed_config", str(path)]
    return train.parse_args(argv)


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_built_in_config(stage, precision):
    config = deepspeed_config(stage, 8, 2, 3, precision, 1.0)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"] == {"stage": int(stage)}
    assert config["gradient_clipping"] == 1.0 and config["bf16"]["enabled"] == (precision == "bf16")
    assert config.get("fp16", {}).get("enabled", False) == (precision == "fp16")
    if precision == "fp16":
        assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert all(config[k] == v for k, v in BASE.items())


def test_file_settings_become_the_runs(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 3,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "bf16": {"enabled": True},
        "gradient_clipping": 0.5,
    }
    args = parse(tmp_path, user)
    assert (args.batch_size, args.grad_accum, args.zero_stage, args.precision) == (6, 3, "2", "bf16")
    resolved = (args.zero_stage, args.batch_size, args.grad_accum, 2, args.precision, args.grad_clip)
    config = deepspeed_config(*resolved, args.ds_config)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the user's other settings kept
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] and user["zero_optimization"]["stage"] == 2
    # flags that agree with the file are fine; a file without a stage still means the DeepSpeed engine
    assert parse(tmp_path, user, "--batch-size", "6", "--bf16").batch_size == 6
    assert parse(tmp_path, {"gradient_clipping": 2.0}).zero_stage == "0"


@pytest.mark.parametrize(
    "config,flags,message",
    [
        ({"train_micro_batch_size_per_gpu": 6}, ["--batch-size", "8"], "--batch-size 8 contradicts"),
        ({"train_micro_batch_size_per_gpu": 6}, ["--batch-size=8"], "--batch-size 8 contradicts"),
        ({"zero_optimization": {"stage": 4}}, [], "stages 0, 1, 2 and 3"),
        ({"zero_optimization": {"stage": 1}}, ["--zero-stage", "2"], "--zero-stage 2 contradicts"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], "both enabled"),
        ({"bf16": {"enabled": True}}, ["--precision", "fp32"], "--precision fp32 contradicts"),
        ({"optimizer": {"type": "Adam"}}, [], "remove its 'optimizer' section"),
        ({"gradient_accumulation_steps": 0}, [], "must be a positive integer"),
        ({}, ["--zero-stage", "off"], "runs without the DeepSpeed engine"),
    ],
)
def test_contradictions_are_refused(tmp_path, config, flags, message):
    with pytest.raises(SystemExit, match=message):
        parse(tmp_path, config, *flags)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        train.parse_args(["--deepspeed_config", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text('{\n  "train_batch_size": 8,\n  oops\n}')
    with pytest.raises(SystemExit, match=r"bad.json:3: not JSON"):
        train.parse_args(["--deepspeed_config", str(tmp_path / "bad.json")])


def test_global_batch_must_match():
    with pytest.raises(SystemExit, match="train_batch_size 32 is not 4 posts x 2 micro-batches x 2 rank"):
        deepspeed_config("1", 4, 2, 2, "fp32", 0.0, {"train_batch_size": 32})
    assert deepspeed_config("1", 4, 2, 2, "fp32", 0.0, {"train_batch_size": 16})["train_batch_size"] == 16


@pytest.mark.parametrize("flags", [["--fp16", "--bf16"], ["--precision", "bf16", "--fp16"], ["--zero-stage", "4"]])
def test_contradictory_flags_fail_in_argparse(flags):
    proc = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and ("not allowed with" in proc.stderr or "invalid choice" in proc.stderr)


def test_fp16_on_cpu_fails_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--fp16", "--output-dir", str(tmp_path), "--epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "on CPU use fp32 or bf16" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
