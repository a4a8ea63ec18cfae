"""Checkpoints that resume a run exactly: atomic, verified on load, rotated, and the source of the model export.

A checkpoint is the folder ``OUTPUT/checkpoints/step<N>`` (N = training steps done) holding

- the engine's own files (``PlainEngine``'s ``plain_states.pt`` or DeepSpeed's ``mp_rank_*`` / ``zero_pp_rank_*``
  files): model, optimizer, learning-rate schedule;
- ``train_state.json``: the :class:`TrainState` (epoch, position in the epoch's data order, best dev F1 and the step
  it was reached at, non-finite step counters, the epoch's running sums, the image counters, the length of
  ``metrics.jsonl`` at that step);
- ``rng_rank<r>.pt`` per rank: the Python, numpy, torch CPU and CUDA generator states;
- ``manifest.json``, written last: every file of the checkpoint and its size.

Every rank writes into ``checkpoints/.staging/step<N>``; rank 0 then writes the manifest, fsyncs the files and renames
the folder into place, so a ``step<N>`` folder is complete or absent (a rename is atomic), and a folder whose files
no longer match their manifest (truncated on disk) is skipped on resume with a warning. The training loader's order is
a function of (seed, epoch) (``DistributedSampler`` / ``LengthBucketSampler``), so the position in it is the number
of batches already trained (:class:`tpm_fast.engine.ResumableBatches` skips them); DataLoader workers are seeded from
the run's seed (:func:`tpm_fast.engine.seed_worker`) and draw nothing from the main process's generators.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from tpm_fast.plain_engine import CHECKPOINT_FILE

PREFIX = "step"
STAGING = ".staging"
MANIFEST = "manifest.json"
STATE_FILE = "train_state.json"


@dataclasses.dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint as ``train_state.json``.

    Attributes:
        step: training steps done (one per optimizer step, applied or skipped as non-finite).
        epoch: epochs finished.
        batch: batches of epoch ``epoch + 1`` already trained (its position in the epoch's data order).
        best_f1, best_epoch, best_step: best dev F1 so far and the epoch and step it was reached at (0: none yet).
        bad_steps: non-finite steps in a row; skipped_steps: all non-finite steps of the run.
        epoch_loss, epoch_steps: the current epoch's sum of applied step losses and its applied steps.
        train_gold, train_pred: the current epoch's word tags when ``--train-f1`` decodes training batches.
        images: the run's image counters (:class:`tpm_fast.data.images.ImageStats`) at this step.
        metrics_bytes: length of ``metrics.jsonl`` at this step (resuming cuts off what was logged after it).
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    best_step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    train_gold: list = dataclasses.field(default_factory=list)
    train_pred: list = dataclasses.field(default_factory=list)
    images: dict = dataclasses.field(default_factory=dict)
    metrics_bytes: int = 0


class StopRequest:
    """Catches SIGTERM (a scheduler's preemption, ``kill``): the run is to checkpoint after its current step and exit.

    Args:
        signals: the signals to catch.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._catch)

    def _catch(self, signum: int, frame) -> None:
        self.requested = True


def rng_state() -> dict:
    """The generator states of this process: Python, numpy, torch CPU and (where present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_of(step: int) -> str:
    """The checkpoint folder name of ``step``."""
    return f"{PREFIX}{step}"


def step_of(folder: Path) -> int | None:
    """The step of a checkpoint folder name (``step<N>``), None for any other name."""
    digits = folder.name[len(PREFIX) :]
    return int(digits) if folder.name.startswith(PREFIX) and digits.isdigit() else None


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders in ``ckpt_dir``, oldest step first (complete or not: see :func:`problem`)."""
    found = [p for p in Path(ckpt_dir).glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (no manifest, a file missing or of another size), or None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint was not finished)"
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def newest_complete(ckpt_dir: Path, warn=print) -> Path | None:
    """The complete checkpoint of the highest step in ``ckpt_dir`` (``warn`` is told about each one skipped)."""
    for folder in reversed(checkpoints(ckpt_dir)):
        why = problem(folder)
        if why is None:
            return folder
        warn(f"warning: skipping checkpoint {folder}: {why}")
    return None


def load_state(folder: Path, rank: int) -> tuple[TrainState, dict]:
    """Read a complete checkpoint's :class:`TrainState` and this rank's generator states.

    Raises:
        SystemExit: the checkpoint was written by more ranks than it has RNG files for this one.
    """
    state = TrainState(**json.loads((folder / STATE_FILE).read_text()))
    rng_file = folder / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise SystemExit(f"--resume: {folder} has no {rng_file.name}: resume with the ranks it was written by")
    return state, torch.load(rng_file, weights_only=False)


def save(engine, ckpt_dir: Path, state: TrainState, rank: int, barrier) -> Path:
    """Write a checkpoint of ``engine`` and ``state`` at ``state.step``, atomically; every rank calls this.

    Args:
        engine: ``PlainEngine`` or a DeepSpeed engine (``save_checkpoint(dir, tag, save_latest=...)``).
        ckpt_dir: the checkpoints folder.
        state: the run's state (saved as ``train_state.json``).
        rank: this rank (writes its generator states; rank 0 commits).
        barrier: waits for every rank (``deepspeed.comm.barrier``).

    Returns:
        The committed folder ``ckpt_dir/step<N>``.
    """
    tag = tag_of(state.step)
    staging, final = Path(ckpt_dir) / STAGING, Path(ckpt_dir) / tag
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    torch.save(rng_state(), staging / tag / f"rng_rank{rank}.pt")
    barrier()  # every rank's files are written
    if rank == 0:
        folder = staging / tag
        (folder / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            fsync(path)
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in files}
        write_atomically(folder / MANIFEST, json.dumps({"step": state.step, "files": sizes}, indent=1))
        if final.exists():  # the same step again (resumed from an older checkpoint): the new one replaces it
            shutil.rmtree(final)
        folder.replace(final)
        write_atomically(Path(ckpt_dir) / "latest", tag)  # DeepSpeed's pointer to the newest checkpoint
        fsync(Path(ckpt_dir))
    barrier()  # committed before any rank goes on
    return final


def clear_staging(ckpt_dir: Path) -> None:
    """Remove what a save interrupted by a kill left in ``ckpt_dir/.staging`` (rank 0, before the first save)."""
    shutil.rmtree(Path(ckpt_dir) / STAGING, ignore_errors=True)


def rotate(ckpt_dir: Path, keep: int, best_step: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and the one of ``best_step`` (the model export's source)."""
    folders = checkpoints(ckpt_dir)
    for folder in folders[: max(0, len(folders) - keep)]:
        if step_of(folder) != best_step:
            shutil.rmtree(folder, ignore_errors=True)


def resume_folder(resume: str, ckpt_dir: Path, warn=print) -> Path:
    """The checkpoint ``--resume`` names: ``"newest"`` (the newest complete one in ``ckpt_dir``) or a folder.

    Raises:
        SystemExit: no complete checkpoint there (naming the folder and why).
    """
    if resume == "newest":
        folder = newest_complete(ckpt_dir, warn)
        if folder is None:
            raise SystemExit(f"--resume: no complete checkpoint in {ckpt_dir}")
        return folder
    folder = Path(resume)
    why = problem(folder) if folder.is_dir() else f"{folder} is not a folder"
    if why is not None:
        raise SystemExit(f"--resume {resume}: not a complete checkpoint: {why}")
    return folder


def finished(out: Path, state: TrainState) -> bool:
    """True when ``out/results.json`` holds the final test of the run at ``state`` (nothing is left to do)."""
    try:
        return json.loads((Path(out) / "results.json").read_text()).get("step") == state.step
    except (OSError, ValueError):
        return False


def exported_step(path: Path) -> int | None:
    """The training step the export at ``path`` was made at (None: absent or unreadable).

    Args:
        path: an export folder (its ``config.json`` records ``training.step``) or a legacy ``best_model.pt`` file.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text(encoding="utf-8")).get("training", {}).get("step")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except (OSError, RuntimeError, ValueError, AttributeError):
        return None


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a checkpoint, from either engine's files (ZeRO stages 1-3 gathered from their
    partitions; stage 0 and ``PlainEngine`` hold them whole)."""
    folder = Path(folder)
    if (folder / CHECKPOINT_FILE).is_file():
        return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False, mmap=True)["module"]
    if list(folder.glob("*optim_states.pt")):  # ZeRO 1-3: fp32 masters partitioned over the ranks
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    blob = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}


def cut_log(path: Path, size: int) -> None:
    """Cut the append-only log ``path`` back to its first ``size`` bytes (what it held at the resumed checkpoint)."""
    if path.is_file() and path.stat().st_size > size:
        with open(path, "rb") as f:
            kept = f.read(size)
        write_atomically(path, kept.decode("utf-8"))


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, fsync, rename: the file is old or new, never partial."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
