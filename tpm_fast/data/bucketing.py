"""Length-bucketed training batches: posts of similar length share a batch, batches come in random order.

Padding every post of a batch to its longest one wastes compute in proportion to the spread of lengths: on
MNER-MI-like posts (6-64 pieces) random batches of 32 are ~44 % padding, bucketed ones ~8 % (``bench/README.md``).
transformers' ``LengthGroupedSampler`` sorts random mega-batches but then serves each mega-batch's batches from
longest to shortest, a fixed long-to-short sweep repeated through the epoch; here the batches are shuffled after they
are cut, as fairseq does, so the order of lengths carries no pattern. Mega-batches are kept small (8 batches, against
transformers' 50) so that a batch's composition is less a function of length.

Bucketing still changes what a batch holds: on the embedded corpus (800 posts, 7 seeds) it lowered the mean dev F1
from 95.4 to 93.6 and widened its spread. ``train.py`` therefore buckets only where padding would cost at least a
quarter of the step's FLOPs (:func:`tpm_fast.runtime.choose_bucketing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler (``DataLoader(batch_sampler=...)``) of length-bucketed batches, sharded over ranks.

    Each epoch: a seeded permutation of the posts (padded to a whole number of global batches by repeating its
    first posts, as ``DistributedSampler`` pads); mega-batches of ``mega_batches`` global batches, each sorted by
    length; cut into global batches of ``batch_size * world`` posts; global batches shuffled; rank ``r`` takes every
    ``world``-th post of each global batch (so every rank gets a batch of the same lengths, and the same number of
    batches).

    Args:
        lengths: length (e.g. word pieces) of each post.
        batch_size: posts per rank and batch.
        world, rank: data-parallel ranks and this one.
        seed: seed of the order; the order also depends on the epoch (:meth:`set_epoch`).
        mega_batches: global batches per sorted mega-batch (larger: less padding, less randomness).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega_batches: int = 8,
    ) -> None:
        if batch_size < 1 or world < 1 or not 0 <= rank < world or mega_batches < 1:
            raise ValueError(f"bad batch_size={batch_size}, world={world}, rank={rank} or mega_batches={mega_batches}")
        if not lengths:
            raise ValueError("LengthBucketSampler needs at least one post")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world
        return -(-len(self.lengths) // global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        global_batch = self.batch_size * self.world
        total = len(self) * global_batch
        order = torch.randperm(len(self.lengths), generator=g)  # shape: (N,)
        order = torch.cat([order, order.repeat(total // len(order) + 1)])[:total]  # pad to whole global batches
        mega = global_batch * self.mega_batches
        batches = []
        for start in range(0, total, mega):
            chunk = order[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]  # shape: (<= mega,), by length
            batches += list(chunk.split(global_batch))
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i][self.rank :: self.world].tolist()
