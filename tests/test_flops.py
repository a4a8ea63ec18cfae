"""step_flops against torch's own FLOP counter on a real TPM-MI step, and the MFU peak table."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.test_model import make_config
from tpm_fast.flops import padding_share, peak_flops, posts_flops, step_flops
from tpm_fast.model import TPMMI


@pytest.mark.parametrize("image_mode", ["text", "multi"])
def test_step_flops_match_torch_flop_counter(image_mode):
    """No padding and every image slot filled, so the model FLOPs are all the matmul FLOPs torch counts (the CRF's
    tiny per-step products aside)."""
    torch.manual_seed(0)
    config = make_config(image_mode=image_mode)
    config.vit = dict(config.vit, attn_implementation="eager")  # torch's counter has no formula for CPU SDPA
    model = TPMMI(config, backend="reference").train()
    b, n, m = 3, 11, 4
    batch = {
        "input_ids": torch.randint(1, 40, (b, n)),
        "attention_mask": torch.ones(b, n, dtype=torch.bool),
        "labels": torch.randint(0, 10, (b, n)),
        "pixel_values": torch.randn(b * m, 3, 32, 32),
        "image_post": torch.arange(b).repeat_interleave(m),
        "image_slot": torch.arange(m).repeat(b),
        "image_mask": torch.ones(b, m, dtype=torch.bool),
    }
    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    crf = 3 * 2 * b * n * 10 * 10  # the exp-space CRF's (B, T) @ (T, T) per step, forward and backward
    counted = counter.get_total_flops() - crf
    assert step_flops(model, batch) == pytest.approx(counted, rel=0.01)


def test_step_flops_count_real_work_only():
    model = TPMMI(make_config(image_mode="text"), backend="reference")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    short = {"attention_mask": mask}
    padded = {"attention_mask": torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)}
    assert step_flops(model, short) == step_flops(model, padded) > 0


def test_peak_flops_only_for_known_gpus():
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_padding_share_counts_the_padded_pieces():
    """Equal lengths pad nothing; with random lengths the share equals the padded FLOPs summed batch by batch."""
    model = TPMMI(make_config(image_mode="multi"), backend="reference")
    assert padding_share(model, [9] * 10, [2] * 10, batch_size=4) == 0.0
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    lengths, images = (
        torch.randint(3, 40, (23,), generator=g).tolist(),
        torch.randint(0, 5, (23,), generator=g).tolist(),
    )
    order = torch.randperm(23, generator=torch.Generator().manual_seed(7)).tolist()
    real = padded = 0.0
    for start in range(0, 23, 5):
        idx = order[start : start + 5]
        n = torch.tensor([lengths[i] for i in idx])
        real += posts_flops(model, n, sum(images[i] for i in idx))
        padded += posts_flops(model, torch.full_like(n, int(n.max())), sum(images[i] for i in idx))
    assert padding_share(model, lengths, images, batch_size=5, seed=7) == pytest.approx(1 - real / padded)
    text = TPMMI(make_config(image_mode="text"), backend="reference")
    assert padding_share(text, lengths, images, 5, seed=7) > padding_share(model, lengths, images, 5, seed=7) > 0
    # packed BERT: padding costs only the attention of the padded (B, n) grid
    bc, layers = text.bert.config, text.bert.config.num_hidden_layers
    real = extra = 0.0
    for start in range(0, 23, 5):
        n = torch.tensor([lengths[i] for i in order[start : start + 5]])
        real += posts_flops(text, n, 0)
        extra += 3 * layers * 4 * bc.hidden_size * float(len(n) * n.max() ** 2 - (n**2).sum())
    packed = padding_share(text, lengths, images, 5, seed=7, packed=True)
    assert packed == pytest.approx(extra / (real + extra))
    assert 0 < packed < padding_share(text, lengths, images, 5, seed=7)
