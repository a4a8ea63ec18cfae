"""Checkpoint files: committed whole or not at all, verified against their manifest, rotated, logs cut back."""

import errno
import json

import pytest
import torch
from torch import nn

from tpm_fast import checkpoint
from tpm_fast.checkpoint import TrainState
from tpm_fast.plain_engine import CHECKPOINT_FILE, PlainEngine


def engine() -> PlainEngine:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=0.1))


def save(eng: PlainEngine, ckpt_dir, step: int, **fields):
    return checkpoint.save(eng, ckpt_dir, TrainState(step=step, **fields), rank=0, barrier=lambda: None)


def test_saved_checkpoint_is_complete_and_restores_state_and_generators(tmp_path):
    eng = engine()
    torch.manual_seed(5)
    folder = save(eng, tmp_path, 7, epoch=1, batch=3, best_step=4)
    expected = torch.rand(3)
    assert folder == tmp_path / "step7" and checkpoint.problem(folder) is None
    assert not (tmp_path / checkpoint.STAGING / "step7").exists() and (tmp_path / "latest").read_text() == "step7"
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())["files"]
    assert set(manifest) == {CHECKPOINT_FILE, "rng_rank0.pt", checkpoint.STATE_FILE}
    state, rng = checkpoint.load_state(folder, rank=0)
    assert (state.step, state.epoch, state.batch, state.best_step) == (7, 1, 3, 4)
    checkpoint.set_rng_state(rng)
    assert torch.equal(torch.rand(3), expected)  # the generators continue where the run was
    weights = checkpoint.checkpoint_weights(folder)
    assert all(torch.equal(weights[k], v) for k, v in eng.module.state_dict().items())


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    eng = engine()
    save(eng, tmp_path, 5)
    newest = save(eng, tmp_path, 10)
    data = (newest / CHECKPOINT_FILE).read_bytes()
    (newest / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    warnings = []
    assert checkpoint.newest_complete(tmp_path, warnings.append) == tmp_path / "step5"
    assert "truncated" in warnings[0] and str(newest / CHECKPOINT_FILE) in warnings[0]
    with pytest.raises(SystemExit, match="not a complete checkpoint.*truncated"):
        checkpoint.resume_folder(str(newest), tmp_path)
    (tmp_path / "step5" / checkpoint.MANIFEST).unlink()  # as a save killed before its manifest
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        checkpoint.resume_folder("newest", tmp_path, warnings.append)


def test_disk_full_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    eng = engine()
    save(eng, tmp_path, 5)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space"):
        save(eng, tmp_path, 10)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step5"]
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "step5" and (tmp_path / "latest").read_text() == "step5"
    checkpoint.clear_staging(tmp_path)  # what a resumed run does first
    assert not (tmp_path / checkpoint.STAGING).exists()


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    eng = engine()
    for step in (2, 4, 6, 8, 10):
        save(eng, tmp_path, step)
    checkpoint.rotate(tmp_path, keep=2, best_step=4)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step4", "step8", "step10"]


def test_cut_log_drops_what_was_logged_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n')
    size = log.stat().st_size
    with open(log, "a") as f:
        f.write('{"step": 2}\n{"ste')
    checkpoint.cut_log(log, size)
    assert log.read_text() == '{"step": 1}\n'
