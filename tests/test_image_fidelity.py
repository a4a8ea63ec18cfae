"""Every image path against HF's ViTImageProcessor on real photographs (scikit-image's samples, re-encoded at
400-2048 px as JPEG and PNG): mean absolute difference of the normalized pixels <= 0.02 and cosine similarity of a
ViT's [CLS] output >= 0.999. The ViT is a small randomly initialized one (nothing is downloaded); the test first
checks that it tells different photographs apart (their cosine is far below the bar), so the bar can fail."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from tests.image_corpus import write_photos
from tests.test_image_sources import SOURCES, make_source
from tpm_fast.data.images import ImageSpec, normalize

MAX_MEAN_ABS = 0.02
MIN_CLS_COSINE = 0.999
SPEC = ImageSpec(224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # ImageNet's, unlike the default's


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = write_photos(folder, np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to the PIL backend"
        proc = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=SPEC.mean, image_std=SPEC.std)
    refs = []
    for path in paths:
        with Image.open(path) as im:
            refs.append(np.asarray(proc(images=im.convert("RGB"), return_tensors="np")["pixel_values"][0]))
    return folder, paths, torch.as_tensor(np.stack(refs))  # shape: (P, 3, 224, 224)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=192, initializer_range=0.2)  # fmt: skip
    model = ViTModel(config, add_pooling_layer=False).eval()

    def cls(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(pixel_values=pixels).last_hidden_state[:, 0]  # shape: (P, d)

    return cls


def test_the_vit_tells_photographs_apart(photos, vit):
    _, paths, refs = photos
    cls = vit(refs)
    cos = torch.nn.functional.cosine_similarity(cls[:, None], cls[None], dim=-1)  # shape: (P, P)
    off_diagonal = cos[~torch.eye(len(paths), dtype=torch.bool)]
    assert off_diagonal.max() < 0.99, off_diagonal.max()
    shifted = torch.roll(refs, shifts=8, dims=-1)  # the same photographs moved by half a patch
    assert (shifted - refs).abs().mean() > MAX_MEAN_ABS


@pytest.mark.parametrize("name", SOURCES)
def test_source_matches_the_vit_image_processor(photos, vit, tmp_path, name):
    folder, paths, refs = photos
    source = make_source(name, SPEC, tmp_path, paths)
    pixels, events = source.load(paths)
    assert [e.kind for e in events] == ["ok"] * len(paths)
    out = normalize(pixels, SPEC).cpu()  # shape: (P, 3, 224, 224)
    diff = (out - refs).abs().mean(dim=(1, 2, 3))  # shape: (P,)
    cosine = torch.nn.functional.cosine_similarity(vit(out), vit(refs), dim=-1)  # shape: (P,)
    assert diff.max() <= MAX_MEAN_ABS, dict(zip([p.name for p in paths], diff.tolist()))
    assert cosine.min() >= MIN_CLS_COSINE, dict(zip([p.name for p in paths], cosine.tolist()))
