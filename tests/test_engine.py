"""Training loaders: length-bucketed batches that still cover every post once per epoch, sharded over ranks."""

import random

import pytest
from transformers import BertTokenizer

from tpm_fast.data.bucketing import LengthBucketSampler
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.readers import Post
from tpm_fast.engine import make_loader, set_epoch

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
