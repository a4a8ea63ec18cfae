"""The run record, ``OUTPUT/run.json``: what a run was given and chose, what it ran on, and what data it read.

Written by rank 0 when a run starts (and again, as ``resumes``, each time it is resumed); exported models carry a copy.
The data fingerprint (each split file's SHA-256 and size; the images the posts name, counted with their total size,
from ``stat`` only) is compared on ``--resume`` and ``--eval-only``: a changed file gets a warning naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from tpm_fast import __version__
from tpm_fast.checkpoint import write_atomically

RUN_FILE = "run.json"
PACKAGES = ("torch", "transformers", "deepspeed", "triton", "nvidia-dali-cuda120", "nvidia-dali-cuda130")


def versions() -> dict[str, str]:
    """Python's and the installed versions of the packages a run depends on (absent ones left out), and the git
    commit of tpm-fast's source tree when it is a git checkout."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["tpm-fast"] = __version__
    commit = git_commit(Path(__file__).resolve().parents[1])
    if commit:
        found["tpm-fast-commit"] = commit
    return found


def git_commit(folder: Path) -> str | None:
    """The commit checked out in ``folder`` (with ``+dirty`` when files differ from it), or None outside git."""
    if not (folder / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_info(device: torch.device, world: int) -> dict:
    """The training device (GPU name and compute capability, or the CPU model) and the number of ranks."""
    info = {"type": device.type, "ranks": world}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        info["name"] = cpu_model()
    return info


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(split_files: dict[str, Path], posts: dict[str, list]) -> dict:
    """The data's fingerprint.

    Args:
        split_files: split -> the file it was read from.
        posts: split -> its posts (``Post.images``: the image paths they name).

    Returns:
        ``{"files": {split: {"path", "sha256", "bytes"}}, "images": {split: {"named", "present", "bytes"}}}``.
    """
    files = {s: {"path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size} for s, p in split_files.items()}
    images = {}
    for split, split_posts in posts.items():
        named = present = size = 0
        for post in split_posts:
            for path in post.images:
                named += 1
                try:
                    size += path.stat().st_size
                    present += 1
                except OSError:
                    pass
        images[split] = {"named": named, "present": present, "bytes": size}
    return {"files": files, "images": images}


def differences(recorded: dict, now: dict) -> list[str]:
    """What changed between two fingerprints, one line each (empty when nothing did)."""
    changed = []
    for split, was in recorded.get("files", {}).items():
        is_ = now.get("files", {}).get(split)
        if is_ is None or is_["sha256"] != was["sha256"]:
            where = is_["path"] if is_ else was["path"]
            changed.append(f"{split} file {where}: content differs from the recorded run's ({was['path']})")
    for split, was in recorded.get("images", {}).items():
        is_ = now.get("images", {}).get(split)
        if is_ is not None and is_ != was:
            changed.append(
                f"{split} images: {is_['present']} of {is_['named']} present ({is_['bytes']} bytes), recorded "
                f"{was['present']} of {was['named']} ({was['bytes']} bytes)"
            )
    return changed


def run_record(args, choices: dict, device: dict, data: dict) -> dict:
    """The record of a run: its resolved arguments (after ``--recipe`` and ``--deepspeed_config``), the recipe's
    settings, what was chosen for the machine (with why), versions, device and data fingerprint."""
    skip = ("local_rank", "ds_config", "recipe_settings")
    arguments = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    recipe = getattr(args, "recipe_settings", None)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "arguments": arguments,
        "recipe": dict(dataclasses.asdict(recipe), name=args.recipe) if recipe else None,
        "deepspeed_config_file": args.ds_config,
        "choices": choices,
        "versions": versions(),
        "device": device,
        "data": data,
    }


def write_record(out: Path, record: dict) -> None:
    """Write ``out/run.json``; a resumed run keeps the first record and appends its own to ``resumes``."""
    path = out / RUN_FILE
    if path.is_file():
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append({k: record[k] for k in ("command", "versions", "device", "data")})
        record = first
    write_atomically(path, json.dumps(record, indent=2, sort_keys=True, default=str))


def read_record(folder: Path) -> dict | None:
    """The run record in ``folder`` (None when there is none)."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
