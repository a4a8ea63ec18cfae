"""The image sources (PIL thread pool, decoded-image cache, DALI's CPU pipeline) and the feed: the same events for
every file of the bad-image corpus on every source, the same pixels, the cache's resume and invalidation, the
feed's prefetching."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tests.image_corpus import CASES, random_rgb, write_corpus
from tpm_fast.data import cache as cache_module
from tpm_fast.data.cache import CachedImages, ImageCache
from tpm_fast.data.dataset import MNERDataset, collate
from tpm_fast.data.feed import ImageFeed, PILImages, assemble
from tpm_fast.data.images import ImageLoader, ImageSpec, ImageStats
from tpm_fast.data.readers import Post
from tpm_fast.engine import make_loader

S = 32
SOURCES = ["pil", "pil_threads", "cache", "dali_cpu", "dali_gpu"]


def _dali_missing() -> str | None:
    from tpm_fast.data.dali import dali_unavailable

    return dali_unavailable()


def make_source(name: str, spec: ImageSpec, tmp_path, paths):
    """The source ``name``; the cache is built from ``paths`` first."""
    if name == "pil":
        return PILImages(spec)
    if name == "pil_threads":
        return PILImages(spec, threads=3)
    if name == "cache":
        cache = ImageCache(tmp_path / "cache", spec.size)
        cache.build(paths, threads=2, progress=False)
        return CachedImages(ImageCache(tmp_path / "cache", spec.size), spec)
    if (problem := _dali_missing()) is not None:
        pytest.skip(f"DALI: {problem}")
    if name == "dali_gpu" and not torch.cuda.is_available():
        pytest.skip("DALI's mixed (GPU) decoder needs CUDA (bench/gpu_check.sh runs it)")
    from tpm_fast.data.dali import DaliImages

    return DaliImages(spec, torch.device("cuda" if name == "dali_gpu" else "cpu"), threads=1)


@pytest.mark.parametrize("name", SOURCES)
def test_bad_image_corpus_gives_the_same_events_on_every_source(tmp_path, name):
    paths = write_corpus(tmp_path)
    spec = ImageSpec(S)
    source = make_source(name, spec, tmp_path, list(paths.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels, events = source.load(list(paths.values()))
    assert [(e.kind, e.converted) for e in events] == [(kind, conv) for kind, _, conv in CASES.values()]
    for case, event in zip(CASES, events, strict=True):
        assert (event.message is None) == (event.kind == "ok"), case
        if event.message:
            assert event.message.startswith(str(paths[case])), event.message
    present = [case for case, (_, image, _) in CASES.items() if image]
    assert pixels.shape == (len(present), S, S, 3) and pixels.dtype == torch.uint8
    loader = ImageLoader(spec)
    for row, case in zip(pixels, present, strict=True):
        ref, _ = loader.load_uint8(paths[case])
        diff = (row.cpu().float() - torch.from_numpy(ref).float()).abs().mean()
        assert diff <= (4.0 if name.startswith("dali") else 0.0), (case, float(diff))  # DALI: other decoders


def test_dali_failure_falls_back_to_pil_with_the_same_events(tmp_path, monkeypatch):
    """Should a file reach DALI that DALI cannot decode, the batch is decoded by PIL and the pipeline rebuilt."""
    if (problem := _dali_missing()) is not None:
        pytest.skip(f"DALI: {problem}")
    from tpm_fast.data import dali

    paths = write_corpus(tmp_path)
    names = ["jpeg", "garbage", "png_named_jpg", "html_named_jpg", "one_pixel"]
    monkeypatch.setattr(dali, "for_dali", lambda data: "RGB")  # every readable file goes to DALI
    source = dali.DaliImages(ImageSpec(S), torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels, events = source.load([paths[n] for n in names])
        assert source.failures == 1
        monkeypatch.undo()
        again, _ = source.load([paths["jpeg"]])  # the rebuilt pipeline works
    assert [e.kind for e in events] == ["ok", "undecodable", "ok", "undecodable", "ok"]
    assert pixels.shape == (3, S, S, 3) and again.shape == (1, S, S, 3)


def _photos(tmp_path, n: int, rng: np.random.Generator) -> list:
    paths = []
    for i in range(n):
        path = tmp_path / f"p{i}.jpg"
        random_rgb(rng, int(rng.integers(20, 90)), int(rng.integers(20, 90)), smooth=True).save(path, "JPEG")
        paths.append(path)
    return paths


def test_cache_resumes_an_interrupted_build(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    paths = _photos(tmp_path, 9, rng)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(3, tmp_path / "bad.jpg")
    monkeypatch.setattr(cache_module, "CHUNK", 4)
    calls = []
    real = PILImages.decode

    def interrupted(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second chunk never lands
        return real(self, chunk)

    monkeypatch.setattr(PILImages, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ImageCache(tmp_path / "c", S).build(paths, progress=False)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["rows"] == 3 and len(index["entries"]) == 4  # the first chunk: 3 images and the bad file
    monkeypatch.setattr(PILImages, "decode", real)
    resumed = ImageCache(tmp_path / "c", S)
    assert resumed.build(paths, progress=False) == 6
    clean = ImageCache(tmp_path / "clean", S)
    assert clean.build(paths, progress=False) == 10
    spec = ImageSpec(S)
    (a, ea), (b, eb) = CachedImages(resumed, spec).load(paths), CachedImages(clean, spec).load(paths)
    assert torch.equal(a, b) and [(e.kind, e.converted) for e in ea] == [(e.kind, e.converted) for e in eb]
    assert a.shape == (9, S, S, 3) and ea[3].kind == "undecodable"
    assert CachedImages(resumed, spec).misses == 0


def test_cache_decodes_changed_files_again_and_rebuilds_for_a_new_size(tmp_path):
    rng = np.random.default_rng(6)
    paths = _photos(tmp_path, 3, rng)
    cache = ImageCache(tmp_path / "c", S)
    cache.build(paths, progress=False)
    random_rgb(rng, 50, 40).save(paths[1], "PNG")  # new content, size and mtime
    assert cache.missing(paths) == [paths[1]]
    source = CachedImages(ImageCache(tmp_path / "c", S), ImageSpec(S))
    pixels, events = source.load(paths)
    ref, _ = ImageLoader(ImageSpec(S)).load_uint8(paths[1])
    assert source.misses == 1 and torch.equal(pixels[1], torch.from_numpy(ref))
    bigger = ImageCache(tmp_path / "c", 2 * S)
    assert len(bigger) == 0 and bigger.build(paths, progress=False) == 3
    assert CachedImages(bigger, ImageSpec(2 * S)).load(paths)[0].shape == (3, 2 * S, 2 * S, 3)
    with pytest.raises(ValueError, match="holds 64-pixel images but the ViT needs 32"):
        CachedImages(bigger, ImageSpec(S))


def test_cache_command_line_builds_a_dataset(tmp_path, capsys):
    from tpm_fast.data.synthetic import ensure_synthetic_corpus

    data = ensure_synthetic_corpus(tmp_path / "corpus", seed=3, n_train=12, n_val=4, n_test=4)
    args = ["build", str(tmp_path / "cache"), "--data-dir", str(data), "--dataset", "MI", "--size", str(S)]
    cache_module.main(args)
    first = capsys.readouterr().out
    cache_module.main(args)
    again = capsys.readouterr().out
    paths = cache_module.dataset_images(data, "MI")
    assert paths and "added 0 " in again and "added 0 " not in first
    assert ImageCache(tmp_path / "cache", S).missing(paths) == []


def _dataset(tmp_path, rng: np.random.Generator, n_posts: int) -> MNERDataset:
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "obama", "paris"]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    images = _photos(tmp_path, 2 * n_posts, rng)
    posts = [
        Post(str(i), ["obama", "paris"], ["B-PER", "B-LOC"], images[2 * i : 2 * i + int(rng.integers(0, 3))], f"f:{i}")
        for i in range(n_posts)
    ]
    return MNERDataset(posts, tok, 8)


def test_feed_prefetches_the_same_batches_in_order(tmp_path):
    data = _dataset(tmp_path, np.random.default_rng(7), 11)
    source = PILImages(ImageSpec(S), threads=2)
    loader = make_loader(data, 3, shuffle=False)
    stats = [ImageStats(), ImageStats()]
    ahead = list(ImageFeed(loader, source, torch.device("cpu"), torch.bfloat16, stats[0], prefetch=2))
    inline = list(ImageFeed(loader, source, torch.device("cpu"), torch.bfloat16, stats[1], prefetch=0))
    assert len(ahead) == len(inline) == 4
    for a, b in zip(ahead, inline, strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert a.tensors["pixel_values"].dtype == torch.bfloat16
    assert stats[0].as_dict() == stats[1].as_dict() and stats[0].ok == sum(len(p.images) for p in data.posts) > 0


def test_feed_raises_the_source_error_and_stops_early(tmp_path):
    data = _dataset(tmp_path, np.random.default_rng(8), 9)

    class Broken(PILImages):
        def load(self, paths):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(ImageFeed(make_loader(data, 2, shuffle=False), Broken(ImageSpec(S)), torch.device("cpu")))
    feed = ImageFeed(make_loader(data, 1, shuffle=False), PILImages(ImageSpec(S)), torch.device("cpu"), prefetch=1)
    for _ in feed:  # leaving after one batch must not leave the producer blocked
        break
    batch = assemble(collate([data[0]], pad_id=0), None, torch.device("cpu"))
    assert batch.tensors["pixel_values"].shape == (0, 3, 224, 224) and batch.events == []
