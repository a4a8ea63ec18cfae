"""What the tests' child processes (train.py, deepspeed, tpm_fast.experiment) share."""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without torch.distributed's rank variables (a child starts ranks of its own; it
    must not join the gloo ranks of another test), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(extra)
    return env
