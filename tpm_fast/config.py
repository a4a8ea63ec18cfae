"""The DeepSpeed configuration of a run: built from ``train.py``'s flags, or read from the user's ``--deepspeed_config``
file, whose batch size, accumulation, precision, ZeRO stage and gradient clipping then become the run's (flags that say
otherwise are refused, not silently overridden)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

# what the file's keys set: (key path in the config, train.py flag, argparse dest)
FROM_FILE = (
    (("train_micro_batch_size_per_gpu",), "--batch-size", "batch_size"),
    (("gradient_accumulation_steps",), "--grad-accum", "grad_accum"),
    (("zero_optimization", "stage"), "--zero-stage", "zero_stage"),
)
OWN_SECTIONS = ("optimizer", "scheduler")  # train.py builds these (two learning rates, warm-up then linear decay)
BASE = {
    "zero_allow_untested_optimizer": True,  # torch's AdamW, with the parameter groups train.py makes
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}


def _get(config: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def read_deepspeed_config(path: str, args: argparse.Namespace, given: set[str]) -> dict:
    """Read a DeepSpeed JSON config and move its batch size, accumulation, ZeRO stage and precision into ``args``.

    Args:
        path: the ``--deepspeed_config`` file.
        args: ``train.py``'s arguments (changed in place).
        given: the argparse dests the user set on the command line; a flag given with another value than the file's
            is an error (one of the two would be silently ignored).

    Returns:
        The file's config (a dict).

    Raises:
        SystemExit: the file is missing or not JSON, or contradicts a flag, or sets what train.py builds itself
            (an optimizer or scheduler section), or asks for what cannot run (stage 4, fp16 with bf16, a global
            batch that does not match the micro-batch and accumulation).
    """
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--deepspeed_config {path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"--deepspeed_config {path}: expected a JSON object")
    where = f"--deepspeed_config {path}"
    for section in OWN_SECTIONS:
        if section in config:
            raise SystemExit(
                f"{where}: remove its '{section}' section: train.py builds the optimizer and schedule (AdamW with two "
                "learning rates, linear warm-up and decay; --lr, --head-lr, --weight-decay, --warmup-ratio)"
            )
    for keys, flag, dest in FROM_FILE:
        value = _get(config, keys)
        if value is None:
            continue
        if dest == "zero_stage":
            if value not in (0, 1, 2, 3):
                raise SystemExit(f"{where}: zero_optimization.stage {value!r}: DeepSpeed has stages 0, 1, 2 and 3")
            value = str(value)
        elif not isinstance(value, int) or value < 1:
            raise SystemExit(f"{where}: {'.'.join(keys)} {value!r}: must be a positive integer")
        if dest in given and getattr(args, dest) != value:
            raise SystemExit(f"{flag} {getattr(args, dest)} contradicts {where} ({'.'.join(keys)} {value}): give one")
        setattr(args, dest, value)
    clip = config.get("gradient_clipping")
    if clip is not None:
        if not isinstance(clip, (int, float)) or clip < 0:
            raise SystemExit(f"{where}: gradient_clipping {clip!r}: must be a number >= 0")
        if "grad_clip" in given and args.grad_clip != clip:
            raise SystemExit(f"--grad-clip {args.grad_clip} contradicts {where} (gradient_clipping {clip}): give one")
        args.grad_clip = clip
    fp16, bf16 = (bool(_get(config, (k, "enabled"))) for k in ("fp16", "bf16"))
    if fp16 and bf16:
        raise SystemExit(f"{where}: fp16 and bf16 are both enabled: enable one")
    if fp16 or bf16 or "fp16" in config or "bf16" in config:
        precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
        if "precision" in given and args.precision != precision:
            raise SystemExit(f"--precision {args.precision} contradicts {where} ({precision}): give one")
        args.precision = precision
    if "zero_stage" not in given and _get(config, ("zero_optimization", "stage")) is None:
        args.zero_stage = "0"  # a DeepSpeed config means the DeepSpeed engine
    if args.zero_stage == "off":
        raise SystemExit(f"--zero-stage off runs without the DeepSpeed engine: drop it or {where}")
    return config


def deepspeed_config(
    stage: str, batch_size: int, grad_accum: int, world: int, precision: str, clip: float, user: dict | None = None
) -> dict:
    """The config handed to ``deepspeed.initialize``: the user's file (``user``) or the built-in one, with the run's
    ZeRO stage, micro-batch, accumulation, precision and gradient clipping (``clip``, 0: none) filled in.

    Returns:
        A new dict (``user`` is not changed).

    Raises:
        SystemExit: the user's ``train_batch_size`` is not micro-batch x accumulation x ranks.
    """
    config = copy.deepcopy(user) if user is not None else dict(BASE)
    global_batch = batch_size * grad_accum * world
    if config.get("train_batch_size", global_batch) != global_batch:
        raise SystemExit(
            f"the DeepSpeed config's train_batch_size {config['train_batch_size']} is not {batch_size} posts x "
            f"{grad_accum} micro-batches x {world} rank(s) = {global_batch}: fix it or leave it out"
        )
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum)
    config["gradient_clipping"] = clip
    config.setdefault("zero_optimization", {})["stage"] = int(stage)
    config["bf16"] = dict(config.get("bf16", {}), enabled=precision == "bf16")
    if precision == "fp16":  # dynamic loss scaling: overflowing steps are skipped and the scale lowered
        config["fp16"] = dict({"loss_scale": 0, "initial_scale_power": 16}, **config.get("fp16", {}), enabled=True)
    elif "fp16" in config:
        config["fp16"] = dict(config["fp16"], enabled=False)
    for key, value in BASE.items():
        config.setdefault(key, value)
    return config


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The argparse dests whose flags appear in ``argv`` (``--flag value`` or ``--flag=value``)."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(a == option or a.startswith(option + "=") for a in argv):
                given.add(action.dest)
    return given
