"""Tests of the embedded synthetic multi-image NER corpus (tpm_fast.data.synthetic)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpm_fast.data import synthetic
from tpm_fast.data.synthetic import (
    COMPLETE_MARKER,
    CUE_KINDS,
    SYNTH_TYPES,
    TYPE_HUES,
    corpus_dir_name,
    default_cache_dir,
    ensure_synthetic_corpus,
    is_complete_corpus,
    write_synthetic_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
SMALL = {"n_train": 24, "n_val": 6, "n_test": 6}


def _read_split(folder: Path, split: str) -> tuple[list[dict], list[dict]]:
    """Records and cue metadata of one split."""
    records = [json.loads(line) for line in (folder / f"MNER-MI_{split}.txt").read_text().splitlines()]
    metas = [json.loads(line) for line in (folder / f"MNER-MI_{split}.cues.jsonl").read_text().splitlines()]
    return records, metas


def _tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, keyed by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _hue_oracle(path: Path) -> str | None:
    """Type whose colour dominates the image (>30% of pixels saturated and within 25 degrees of its hue), or None."""
    hsv = np.asarray(Image.open(path).convert("HSV"), dtype=np.float32)  # shape: (h, w, 3), 0..255
    hue, sat = hsv[..., 0] * (360.0 / 255.0), hsv[..., 1] / 255.0
    best, best_frac = None, 0.3
    for t, h0 in TYPE_HUES.items():
        dist = np.abs((hue - h0 + 180.0) % 360.0 - 180.0)
        frac = float(np.mean((sat > 0.4) & (dist < 25.0)))
        if frac > best_frac:
            best, best_frac = t, frac
    return best


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A medium corpus shared by the read-only tests (about 2 s to write)."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus") / "c", seed=3, n_train=240, n_val=24, n_test=120)


def test_format_valid(corpus: Path) -> None:
    allowed = {"O"} | {f"{p}-{t}" for p in "BI" for t in SYNTH_TYPES}
    ids = []
    for split in SPLITS:
        records, metas = _read_split(corpus, split)
        assert len(records) == len(metas) > 0
        for rec, meta in zip(records, metas):
            assert set(rec) == {"id", "text", "images", "label", "url"}
            assert isinstance(rec["id"], int) and rec["id"] == meta["id"]
            ids.append(rec["id"])
            assert len(rec["text"]) == len(rec["label"]) > 0
            assert all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in rec["text"])
            prev = "O"
            for tag in rec["label"]:
                assert tag in allowed
                if tag.startswith("I-"):
                    assert prev in (f"B-{tag[2:]}", tag), rec
                prev = tag
            start, end = meta["span"]
            assert rec["label"][start:end] == [f"B-{meta['type']}"] + [f"I-{meta['type']}"] * (end - start - 1)
            assert end == len(rec["label"]) or not rec["label"][end].startswith("I-")
            assert 1 <= len(rec["images"]) <= 4
            assert rec["images"] == [f"{rec['id']}_{k}.jpg" for k in range(len(rec["images"]))]
    assert len(ids) == len(set(ids))
    # every image of a few posts opens and has the documented size range
    records, _ = _read_split(corpus, "test")
    for rec in records[:20]:
        for name in rec["images"]:
            with Image.open(corpus / "images" / name) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert 48 <= im.width <= 160 and 48 <= im.height <= 160
    n_files = sum(len(r["images"]) for s in SPLITS for r in _read_split(corpus, s)[0])
    assert len(list((corpus / "images").iterdir())) == n_files
    assert is_complete_corpus(corpus)
    assert "later_image" in (corpus / "README.txt").read_text()


def test_cue_design_proportions(corpus: Path) -> None:
    n_images = []
    for split in SPLITS:
        records, metas = _read_split(corpus, split)
        cues = Counter(m["cue"] for m in metas)
        types = Counter(m["type"] for m in metas)
        assert set(cues) == set(CUE_KINDS)
        assert max(cues.values()) - min(cues.values()) <= 1  # balanced by construction
        assert max(types.values()) - min(types.values()) <= 1
        for rec, meta in zip(records, metas):
            k = len(rec["images"])
            n_images.append(k)
            if meta["cue"] == "text":
                assert meta["signal_image"] is None
            elif meta["cue"] == "first_image":
                assert meta["signal_image"] == 0
            else:
                assert k >= 2 and 1 <= meta["signal_image"] < k
    assert set(n_images) == {1, 2, 3, 4}
    assert 2.4 <= float(np.mean(n_images)) <= 3.1
    # second mentions: about half of the posts have 2 entities
    records, _ = _read_split(corpus, "train")
    n_ent = Counter(sum(t.startswith("B-") for t in r["label"]) for r in records)
    assert set(n_ent) == {1, 2} and 0.35 < n_ent[2] / len(records) < 0.65


def test_hue_oracle_recovers_image_cued_types(corpus: Path) -> None:
    hits, total, neutral_ok, neutral_total = 0, 0, 0, 0
    for split in SPLITS:
        records, metas = _read_split(corpus, split)
        for rec, meta in zip(records, metas):
            for k, name in enumerate(rec["images"]):
                pred = _hue_oracle(corpus / "images" / name)
                if k == meta["signal_image"]:
                    hits += pred == meta["type"]
                    total += 1
                else:
                    neutral_ok += pred is None
                    neutral_total += 1
    assert total > 100 and hits / total > 0.95
    assert neutral_ok / neutral_total > 0.95


def _contexts(words: list[str], start: int) -> list[tuple[str, ...]]:
    """The 2-word then the 1-word left context of a mention (lowercased)."""
    return [tuple(w.lower() for w in words[max(0, start - n) : start]) for n in (2, 1)]


def test_text_alone_is_ambiguous_only_on_image_cued_posts(corpus: Path) -> None:
    """Majority type per left context (2 words, backing off to 1), fit on train.

    Near chance on image-cued mentions (the cued type is not in the text), near perfect on text-cued ones.
    """
    by_ctx: dict[tuple[str, ...], Counter] = defaultdict(Counter)
    records, metas = _read_split(corpus, "train")
    for rec, meta in zip(records, metas):
        for ctx in _contexts(rec["text"], meta["span"][0]):
            by_ctx[ctx][meta["type"]] += 1
    guess = {ctx: c.most_common(1)[0][0] for ctx, c in by_ctx.items()}
    acc: dict[str, list[bool]] = defaultdict(list)
    records, metas = _read_split(corpus, "test")
    for rec, meta in zip(records, metas):
        pred = next((guess[c] for c in _contexts(rec["text"], meta["span"][0]) if c in guess), "PER")
        acc["text" if meta["cue"] == "text" else "image"].append(pred == meta["type"])
    assert np.mean(acc["text"]) > 0.95
    assert len(acc["image"]) >= 60 and np.mean(acc["image"]) < 0.45  # chance is 0.25


def test_vocab_covers_corpus(corpus: Path) -> None:
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=str(corpus / "vocab.txt"), do_lower_case=True)
    lines = (corpus / "vocab.txt").read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(lines) == len(set(lines))
    assert tok.convert_tokens_to_ids("[PAD]") == 0 and len(tok) == len(lines)
    words = sorted({w for s in SPLITS for r in _read_split(corpus, s)[0] for w in r["text"]})
    for w in words:
        pieces = tok.tokenize(w)
        assert pieces and "[UNK]" not in pieces, (w, pieces)
    # names and cue words are whole pieces (learnable by a small model)
    records, metas = _read_split(corpus, "train")
    for rec, meta in zip(records[:50], metas[:50]):
        for w in rec["text"][meta["span"][0] - 1 : meta["span"][1]]:
            assert len(tok.tokenize(w)) == 1, w
    enc = tok(records[0]["text"], is_split_into_words=True)
    assert tok.unk_token_id not in enc["input_ids"]
    # an unseen word still tokenizes without [UNK] (single-char pieces)
    assert "[UNK]" not in tok.tokenize("Zqxwv_42!")


@pytest.mark.parametrize("seed", [0, 11])
def test_deterministic(tmp_path: Path, seed: int) -> None:
    a = _tree_hashes(write_synthetic_corpus(tmp_path / "a", seed=seed, **SMALL))
    b = _tree_hashes(write_synthetic_corpus(tmp_path / "b", seed=seed, **SMALL))
    assert a == b
    c = _tree_hashes(write_synthetic_corpus(tmp_path / "c", seed=seed + 1, **SMALL))
    assert c["MNER-MI_train.txt"] != a["MNER-MI_train.txt"]
    shared = [k for k in a if k.startswith("images") and k in c]
    assert sum(c[k] != a[k] for k in shared) == len(shared) > 0
    # the train split does not depend on the sizes of the other splits
    d = _tree_hashes(write_synthetic_corpus(tmp_path / "d", seed=seed, n_train=24, n_val=9, n_test=3))
    assert d["MNER-MI_train.txt"] == a["MNER-MI_train.txt"]


def test_ensure_reuses_complete_folder(tmp_path: Path) -> None:
    path = ensure_synthetic_corpus(tmp_path, seed=5, **SMALL)
    assert path == tmp_path / corpus_dir_name(5, **SMALL) and is_complete_corpus(path)
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    again = ensure_synthetic_corpus(tmp_path, seed=5, **SMALL)
    assert again == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == stamps
    leftovers = [p.name for p in tmp_path.iterdir() if p != path and not p.name.endswith(".lock")]
    assert leftovers == []
    # other sizes or seeds get their own folder
    other = ensure_synthetic_corpus(tmp_path, seed=5, n_train=24, n_val=6, n_test=7)
    assert other != path and is_complete_corpus(other)


def test_ensure_replaces_incomplete_folder(tmp_path: Path) -> None:
    final = tmp_path / corpus_dir_name(2, **SMALL)
    final.mkdir()
    (final / "MNER-MI_train.txt").write_text("partial")
    path = ensure_synthetic_corpus(tmp_path, seed=2, **SMALL)
    assert path == final and is_complete_corpus(final)
    assert _tree_hashes(final) == _tree_hashes(write_synthetic_corpus(tmp_path / "ref", seed=2, **SMALL))


def test_publish_keeps_existing_complete_folder(tmp_path: Path) -> None:
    final = write_synthetic_corpus(tmp_path / "final", seed=1, **SMALL)
    stamp = (final / COMPLETE_MARKER).stat().st_mtime_ns
    tmp = write_synthetic_corpus(tmp_path / "tmp", seed=1, **SMALL)
    synthetic._publish(tmp, final)
    assert (final / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    assert tmp.exists()  # the caller removes its own temporary folder


def test_default_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM_FAST_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    path = ensure_synthetic_corpus(None, seed=4, **SMALL)
    assert path.parent == tmp_path / "cache" and is_complete_corpus(path)
    monkeypatch.delenv("TPM_FAST_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tpm_fast"


@pytest.mark.parametrize("use_lock", [True, False])
def test_concurrent_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_lock: bool) -> None:
    if not use_lock:  # every thread generates its own copy and races on the rename
        monkeypatch.setattr(synthetic, "_file_lock", lambda path: nullcontext())
    barrier = threading.Barrier(3)
    results: list[Path] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(ensure_synthetic_corpus(tmp_path / "cache", seed=6, **SMALL))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert entries == [results[0].name]
    assert _tree_hashes(results[0]) == _tree_hashes(write_synthetic_corpus(tmp_path / "ref", seed=6, **SMALL))


def test_concurrent_processes(tmp_path: Path) -> None:
    code = (
        "import sys; from tpm_fast.data.synthetic import ensure_synthetic_corpus as e; "
        "print(e(sys.argv[1], seed=8, n_train=24, n_val=6, n_test=6))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "cache")],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    final = Path(paths.pop())
    assert is_complete_corpus(final)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert entries == [final.name]
    assert _tree_hashes(final) == _tree_hashes(write_synthetic_corpus(tmp_path / "ref", seed=8, **SMALL))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_val": -1}, {"seed": -1}, {"n_test": 2.0}, {"seed": True}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ensure_synthetic_corpus(tmp_path, **kwargs)
    with pytest.raises(ValueError):
        write_synthetic_corpus(tmp_path / "x", **kwargs)


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_synthetic_corpus(tmp_path, **SMALL)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_words_disjoint_from_names() -> None:
    """Cue words never occur as filler, and invented names never collide with any other word."""
    rng = np.random.default_rng(0)
    names = {w.lower() for n in synthetic._make_names(rng) for w in n}
    cue_words = {w for c in synthetic._NEUTRAL_CUES for w in c} | {
        w for cues in synthetic._TEXT_CUES.values() for c in cues for w in c
    }
    filler = {w.lower() for w in synthetic._FILLER}
    assert not names & (cue_words | filler)
    assert not cue_words & filler
    neutral = {c for c in synthetic._NEUTRAL_CUES}
    assert all(not neutral & set(cues) for cues in synthetic._TEXT_CUES.values())
