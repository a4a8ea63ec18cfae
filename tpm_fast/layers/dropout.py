"""`Dropout`: ``nn.Dropout`` over `tpm_fast.ops.dropout.dropout` (the native CPU kernel), and `use_fast_dropout`."""

from __future__ import annotations

from torch import Tensor, nn

from tpm_fast.ops.backend import check_backend
from tpm_fast.ops.dropout import dropout


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose training forward on CPU runs the native kernel (same ``p``, scaling and eval identity;
    the masks come from Philox, not ``bernoulli_``). ``inplace=True`` keeps ``nn.Dropout``'s own path.

    Args:
        p: probability of zeroing an element; inplace: as ``nn.Dropout``; backend: as `tpm_fast.ops.dropout.dropout`.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, backend: str = "auto") -> None:
        super().__init__(p, inplace)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:  # shape: any; the same shape out
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training, backend=self.backend)


def use_fast_dropout(module: nn.Module, backend: str = "auto") -> int:
    """Replace every ``nn.Dropout`` inside ``module`` (exact type, not subclasses) with a `Dropout` of the same ``p``
    (in place; parameters and state_dict are unchanged), and set ``backend`` on every `Dropout`.

    Returns:
        How many modules now run as `Dropout`.
    """
    backend = check_backend(backend)
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            child = Dropout(child.p, child.inplace, backend=backend)
            setattr(module, name, child)
        if isinstance(child, Dropout):
            child.backend = backend
            count += 1
        else:
            count += use_fast_dropout(child, backend)
    return count
