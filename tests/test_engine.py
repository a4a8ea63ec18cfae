"""Loaders over ranks: length-bucketed training batches that still cover every post once per epoch; evaluation
sharded over ranks (gloo processes) and gathered into the one-rank predictions, with losses, posts and image counts
summed over the ranks."""

import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from transformers import BertTokenizer

from tpm_fast.checkpoint import StopRequest
from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, PILImages
from tpm_fast.data.images import ImageSpec, ImageStats
from tpm_fast.data.labels import LABELS
from tpm_fast.data.readers import Post
from tpm_fast.engine import EvalShards, GuardedSteps, make_loader, predict_tags, set_epoch, summed_over_ranks
from tpm_fast.plain_engine import PlainEngine

WORDS = ["obama", "visit", "paris", "new", "york"]


@pytest.fixture(scope="module")
def dataset() -> MNERDataset:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    rng = random.Random(0)
    posts = []
    for i in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 60))]
        posts.append(Post(str(i), words, ["O"] * len(words), [], f"mem:{i}"))
    return MNERDataset(posts, tokenizer, 64, "text")


def padded_share(loader) -> float:
    real = padded = 0
    for batch in loader:
        real += int(batch.tensors["attention_mask"].sum())
        padded += batch.tensors["attention_mask"].numel()
    return 1 - real / padded


def epoch(loader, n: int) -> list[int]:
    set_epoch(loader, n)
    return [i for batch in loader for i in batch.tensors["index"].tolist()]


def test_bucketed_batches_pad_less_and_cover_every_post(dataset):
    bucketed = make_loader(dataset, 16, shuffle=True, seed=3, bucket=True)
    plain = make_loader(dataset, 16, shuffle=True, seed=3)
    assert padded_share(bucketed) < 0.6 * padded_share(plain)
    first = epoch(bucketed, 1)
    assert set(first) == set(range(len(dataset))) and len(first) == 304  # every post; 4 repeated to fill 19 batches
    assert epoch(bucketed, 1) == first  # seeded by (seed, epoch)
    assert epoch(bucketed, 2) != first


def test_bucketed_shards_over_ranks(dataset):
    shards = [epoch(make_loader(dataset, 8, shuffle=True, seed=1, rank=r, world=2, bucket=True), 1) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 152  # 19 global batches of 2 x 8
    assert set(shards[0] + shards[1]) == set(range(len(dataset)))


def test_bucketed_batch_order_has_no_length_sweep():
    """Batches are shuffled after bucketing: the batch lengths of an epoch are not sorted runs (transformers'
    LengthGroupedSampler serves each mega-batch from longest to shortest)."""
    lengths = [(7 * i) % 61 + 1 for i in range(2000)]
    batches = list(LengthBucketSampler(lengths, 8, seed=0, mega_batches=10))
    longest = [max(lengths[i] for i in b) for b in batches]
    ups = sum(a < b for a, b in zip(longest, longest[1:]))
    downs = sum(a > b for a, b in zip(longest, longest[1:]))
    assert abs(ups - downs) < 0.2 * len(longest)  # as many rises as falls: no monotone sweeps
    assert sorted(i for b in batches for i in b) == list(range(2000))


def test_bucket_sampler_pads_ranks_to_equal_batches():
    lengths = list(range(1, 24))  # 23 posts, 2 ranks x 4 posts per batch: 3 global batches, one padded
    shards = [list(LengthBucketSampler(lengths, 4, world=2, rank=r, seed=5)) for r in (0, 1)]
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [4, 4, 4]
    assert set(i for s in shards for b in s for i in b) == set(range(23))


@pytest.mark.parametrize("n,batch_size", [(0, 3), (1, 4), (13, 3), (16, 4), (37, 5)])
def test_eval_shards_deal_out_the_one_rank_batches(n, batch_size):
    one = list(EvalShards(n, batch_size))
    assert [i for b in one for i in b] == list(range(n)) and all(0 < len(b) <= batch_size for b in one)
    for world in (2, 3, 5):
        shards = [list(EvalShards(n, batch_size, world, r)) for r in range(world)]
        assert [b for s in shards for b in s] == one  # the same batches, in rank order
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and EvalShards(n, batch_size, world, 0).most == max(sizes)


class Tagger(nn.Module):
    """decode: a fixed random tag per vocabulary id, so a post's tags do not depend on its batch; counts its calls."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(labels=LABELS)
        self.table = torch.randint(0, len(LABELS), (vocab,), generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def decode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.table[batch["input_ids"]], batch["attention_mask"].sum(1)


def posts_with_missing_images(n: int, seed: int) -> MNERDataset:
    """``n`` posts of 1-9 random words with 0-4 image paths that do not exist (each counted as missing)."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    rng = random.Random(seed)
    posts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
        images = [Path(f"/nonexistent/{i}_{k}.jpg") for k in range(rng.randint(0, 4))]
        posts.append(Post(str(i), words, ["O"] * len(words), images, f"mem:{i}"))
    return MNERDataset(posts, tokenizer, 16, "multi")


def decode_split(n: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
    data = posts_with_missing_images(n, seed=n)
    stats = ImageStats()
    feed = ImageFeed(make_loader(data, batch_size, False, rank=rank, world=world), PILImages(ImageSpec(8)),
                     torch.device("cpu"), stats=stats)  # fmt: skip
    model = Tagger(len(data.tokenizer))
    with warnings.catch_warnings():  # each missing image warns
        warnings.simplefilter("ignore")
        pred = predict_tags(model, feed, progress=False)
    return {"pred": pred, "calls": model.calls, "own": len(feed), "images": summed_over_ranks(stats).as_dict()}


def guarded_step(rank: int, accumulation: int, nan_rank: int | None = None, stop_rank: int | None = None) -> dict:
    """One optimizer step on a 1-weight model (of its own: the ranks do not reduce gradients) whose micro-batch ``k``
    (from 1) has the loss ``(rank + 1) * k`` (NaN on ``nan_rank``) and ``rank + 2``, then ``rank + 1`` posts;
    ``stop_rank`` was asked to stop (as by SIGTERM) before the step."""
    loss_scale = float("nan") if rank == nan_rank else 1.0
    weight = nn.Parameter(torch.ones(()))
    engine = PlainEngine(nn.ParameterList([weight]), torch.optim.SGD([weight], lr=0.1))
    stop = StopRequest(signals=())
    stop.requested = rank == stop_rank
    steps = GuardedSteps(engine, accumulation, stop)
    posts = [rank + 2, rank + 1][:accumulation]
    for k, n in enumerate(posts, 1):
        done = steps.backward(weight * loss_scale * (rank + 1) * k, accumulation, k == accumulation, posts=n)
    return {"loss": done[0], "applied": done[1], "posts": steps.posts, "weight": weight.item(), "stop": steps.stopping}


def rank_worker(rank: int, world: int, folder: str) -> None:
    """One gloo rank: decode two splits (one with fewer batches than ranks), step GuardedSteps; results to JSON."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        result = {
            "splits": [decode_split(13, 3, rank, world), decode_split(4, 4, rank, world)],
            "steps": [
                guarded_step(rank, 1),
                guarded_step(rank, 2),
                guarded_step(rank, 1, nan_rank=1),
                guarded_step(rank, 2, stop_rank=1),
            ],  # fmt: skip
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_evaluation_and_summed_logs_equal_one_rank(tmp_path):
    """Two gloo ranks: every rank returns the one-rank predictions in order after decoding only its own batches
    (13 posts in 5 batches: 2 + 3; 4 posts in 1 batch: 0 + 1), all ranks decode as often, images are counted once;
    a step's loss is the mean over all ranks' posts, a NaN on one rank skips the step on all, and a stop request on
    one rank stops all after the same step."""
    world = 2
    mp.start_processes(rank_worker, args=(world, str(tmp_path)), nprocs=world, start_method="fork")  # imports inherited
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for i, (n, batch_size) in enumerate([(13, 3), (4, 4)]):
        one = decode_split(n, batch_size)
        assert one["images"]["missing"] > 0 and one["calls"] == one["own"]
        splits = [r["splits"][i] for r in ranks]
        assert all(s["pred"] == one["pred"] and s["images"] == one["images"] for s in splits)
        assert [s["own"] for s in splits] == ([2, 3] if n == 13 else [0, 1])
        assert {s["calls"] for s in splits} == {max(s["own"] for s in splits)}
    posts = [[r + 2, r + 1] for r in range(world)]
    for k, accumulation in enumerate((1, 2)):
        steps = [r["steps"][k] for r in ranks]
        sums = sum(n * (r + 1) * j for r in range(world) for j, n in enumerate(posts[r][:accumulation], 1))
        count = sum(sum(p[:accumulation]) for p in posts)
        for step in steps:
            assert step["loss"] == pytest.approx(sums / count, rel=1e-12) and step["applied"]
            assert step["posts"] == count and step["weight"] != 1.0 and not step["stop"]
    for step in (r["steps"][2] for r in ranks):  # rank 1's loss is NaN: no rank steps
        assert not step["applied"] and step["weight"] == 1.0 and step["loss"] != step["loss"]
    assert [r["steps"][3]["stop"] for r in ranks] == [True] * world  # rank 1 was asked: both stop, after the step
    assert all(r["steps"][3]["applied"] for r in ranks)
