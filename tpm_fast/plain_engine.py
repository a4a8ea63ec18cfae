"""`PlainEngine`: the part of DeepSpeed's engine that ``train.py`` uses, as a plain PyTorch loop on one rank.

On one rank ZeRO has nothing to partition, and ``deepspeed.initialize``'s engine costs time per step (measured in
``bench/README.md``) for nothing. ``train.py --zero-stage off`` (the ``auto`` choice on one rank) runs this instead:
same calls (``engine(batch)``, ``backward``, ``step``, ``save_checkpoint``, ``load_checkpoint``), same gradient
clipping and schedule, same checkpoint folder layout (``DIR/<tag>/`` plus DeepSpeed's ``DIR/latest`` file) and the
same fp32 export. Mixed precision is DeepSpeed's bf16 recipe: the module's weights, activations and gradients in
bf16, fp32 master weights in the optimizer. A step converts the bf16 gradients to fp32 a chunk of ~32 MB at a time
and updates that chunk's masters, so the model state stays at 16 bytes a parameter (2 bf16 weights, 2 bf16
gradients, 4 master, 8 Adam), as plain fp32 training's, and a step is a few multi-tensor ops per chunk, where
autocast would cast every weight in every forward and every gradient in every backward.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FILE = "plain_states.pt"
MASTER_CHUNK = 8 * 2**20  # fp32 values converted and updated at a time (32 MB) by a bf16 step


class PlainEngine:
    """Forward, backward, clipped optimizer step and checkpoints for one rank, without DeepSpeed.

    Args:
        model: the module (its parameters are the fp32 weights the optimizer updates).
        optimizer: the optimizer over ``model``'s parameters.
        lr_scheduler: stepped once per optimizer step (may be None).
        gradient_clipping: max global L2 norm of the gradients before each step (0 = no clipping).
        dtype: ``torch.bfloat16`` to convert ``model`` to bf16 and keep fp32 master weights (``optimizer`` must be
            fresh: its parameter groups are pointed at the masters); ``torch.float32`` to train as is.
        skip_nonfinite: skip a step whose gradient norm is NaN or inf (one host read of the norm per step); False:
            every step is applied and a step never reads the device.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        gradient_clipping: float = 0.0,
        dtype: torch.dtype = torch.float32,
        skip_nonfinite: bool = True,
    ) -> None:
        self.module = model
        self.skip_nonfinite = skip_nonfinite
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_clipping = gradient_clipping
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] | None = None  # fp32 master weights when the module is not fp32
        if dtype != torch.float32:
            if optimizer.state:
                raise ValueError("PlainEngine(dtype=bf16) needs a fresh optimizer: it points it at fp32 master weights")
            self.masters = [p.detach().float().clone() for p in self.params]
            master_of = {id(p): m for p, m in zip(self.params, self.masters)}
            for group in optimizer.param_groups:
                group["params"] = [master_of[id(p)] for p in group["params"]]
            model.to(dtype)  # in place: the same Parameter objects, now bf16

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> PlainEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PlainEngine:
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> bool:
        """Clip the gradients' global norm, step the optimizer and the schedule, drop the gradients.

        With bf16 weights (:meth:`_master_step`) the same clipped update is applied to the fp32 masters, which are
        then copied back into the bf16 weights.

        Returns:
            False when ``skip_nonfinite`` and the gradients' norm is not finite (NaN or inf): the step is skipped, the
            gradients dropped, and weights, optimizer state and schedule are left as they were.
        """
        if self.masters is not None:
            applied = self._master_step()
        else:
            norm = None
            if self.gradient_clipping > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clipping, foreach=True)
            elif self.skip_nonfinite:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
            applied = not self.skip_nonfinite or bool(torch.isfinite(norm))
            if applied:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if applied and self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return applied

    @torch.no_grad()
    def _master_step(self) -> bool:
        """Clip by the global norm of the bf16 gradients (accumulated in fp32), then chunk by chunk: gradients to
        fp32, the optimizer's step on that chunk's masters (parameters without a gradient are skipped, as the
        optimizer skips them; each parameter's Adam step count advances once), bf16 gradients dropped. Returns
        False (nothing updated, gradients dropped) when the norm is not finite."""
        used = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in used]
        scale = None
        if grads and (self.gradient_clipping > 0 or self.skip_nonfinite):
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
            if self.skip_nonfinite and not bool(torch.isfinite(norm)):
                for p in self.params:
                    p.grad = None
                return False
            if self.gradient_clipping > 0:  # as clip_grad_norm_: max_norm / (norm + 1e-6), at most 1
                scale = (self.gradient_clipping / (norm + 1e-6)).clamp(max=1.0)
        chunk, size = [], 0
        for n, i in enumerate(used):
            chunk.append(i)
            size += self.masters[i].numel()
            if size >= MASTER_CHUNK or n == len(used) - 1:
                fp32 = [torch.empty_like(self.masters[j]) for j in chunk]
                torch._foreach_copy_(fp32, [self.params[j].grad for j in chunk])
                if scale is not None:
                    torch._foreach_mul_(fp32, scale)
                for j, g in zip(chunk, fp32):
                    self.masters[j].grad, self.params[j].grad = g, None
                self.optimizer.step()
                for j in chunk:
                    self.masters[j].grad = None
                chunk, size = [], 0
        torch._foreach_copy_(self.params, self.masters)
        return True

    def save_checkpoint(
        self, save_dir: str | Path, tag: str, client_state: dict | None = None, save_latest: bool = True
    ) -> None:
        """Write ``save_dir/tag/plain_states.pt`` (weights, optimizer, schedule, client state), then ``latest``
        (unless ``save_latest`` is False, as DeepSpeed's flag).

        Both files are written under a temporary name and renamed, so each is complete or absent.
        """
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "module": self.fp32_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "client_state": dict(client_state or {}),
        }
        _atomic_save(folder / CHECKPOINT_FILE, lambda f: torch.save(state, f))
        if save_latest:
            _atomic_save(Path(save_dir) / "latest", lambda f: f.write(tag.encode()))

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> tuple[str | None, dict]:
        """Load the checkpoint named by ``load_dir/latest`` (or ``tag``); returns (its path or None, client state).

        Raises:
            ValueError: the checkpoint was written by the DeepSpeed engine (resume with the same ``--zero-stage``).
        """
        load_dir = Path(load_dir)
        if tag is None:
            latest = load_dir / "latest"
            if not latest.is_file():
                return None, {}
            tag = latest.read_text().strip()
        path = load_dir / tag / CHECKPOINT_FILE
        if not path.is_file():
            if (load_dir / tag).is_dir():
                raise ValueError(
                    f"{load_dir / tag} was written by the DeepSpeed engine, not by --zero-stage off: resume it with "
                    "the --zero-stage it was trained with"
                )
            return None, {}
        state = torch.load(path, map_location=self.params[0].device if self.params else "cpu", weights_only=False)
        self.module.load_state_dict(state["module"])  # fp32 weights (cast to the module's dtype)
        if self.masters is not None:
            name_of = {id(p): n for n, p in self.module.named_parameters()}
            with torch.no_grad():
                torch._foreach_copy_(self.masters, [state["module"][name_of[id(p)]] for p in self.params])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return str(path.parent), state["client_state"]

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state with the fp32 master weights (the weights to export and to checkpoint)."""
        master_of = dict(zip(map(id, self.params), self.masters or self.params))
        return {
            k: master_of.get(id(v), v).detach().float() if v.is_floating_point() else v.detach()
            for k, v in self.module.state_dict(keep_vars=True).items()
        }


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
