"""``python -m tpm_fast.data.check`` on tiny random corpora in the layouts their authors distribute, with present,
repaired, missing and broken images; every number is counted here from what the test wrote."""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.image_corpus import CASES, build
from tpm_fast.data.check import main

TYPES = ("PER", "LOC", "ORG", "MISC")
SPELLING = {"MI": "MIS", "UNI": "MISC", "twitter2015": "OTHER", "twitter2017": "MISC"}  # MISC as each file writes it
IMAGE_CASES = [c for c in CASES if c != "huge_jpeg"]  # every way an image can be broken, but quick to write


@functools.cache
def image_bytes(case: str) -> bytes | None:
    """The file tests/test_images.py holds to the outcome CASES gives (a truncated JPEG of other pixels may decode)."""
    return build(case, np.random.default_rng(list(CASES).index(case)))


KIND = {"ok": "present", "repaired": "present", "missing": "missing", "undecodable": "broken", "empty_file": "broken"}


def random_tags(rng: np.random.Generator, n: int) -> list[str]:
    """n internal tags: entities of 1-3 words, and now and then an I- tag that begins a chunk (after O)."""
    tags: list[str] = []
    while len(tags) < n:
        r = rng.random()
        if r < 0.25:
            kind = TYPES[rng.integers(4)]
            tags += [f"B-{kind}"] + [f"I-{kind}"] * int(rng.integers(0, 3))
        elif r < 0.3:
            tags += [f"I-{TYPES[rng.integers(4)]}"]
        else:
            tags.append("O")
    return tags[:n]


def chunks(tags: list[str]) -> int:
    """Entities as conlleval scores them: a B- tag, or an I- tag not continuing an entity of its type."""
    n, prev = 0, "O"
    for t in tags:
        n += t.startswith("B-") or (t.startswith("I-") and prev[2:] != t[2:])
        prev = t
    return n


class Corpus:
    """A random corpus written in the layout its authors distribute, and the numbers the check must print."""

    def __init__(self, root: Path, dataset: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dataset = dataset
        twitter = dataset.startswith("twitter")
        if twitter:  # UMT's data/ folder: data/twitter2015/{train,valid,test}.txt beside data/twitter2015_images/
            text, images, t17 = root / dataset, root / f"{dataset}_images", None
            files = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
        else:  # the authors' Dataset/ folder: text/, images/, twitter2017_images/
            text, images, t17 = root / "text", root / "images", root / "twitter2017_images"
            files = {s: f"MNER-{'UNI' if dataset == 'UNI' else 'MI'}_{s}.txt" for s in ("train", "val", "test")}
        for folder in (text, images, t17):
            if folder is not None:
                folder.mkdir(parents=True)
        self.expected: dict[str, dict] = {}
        self.distinct: dict[str, Counter] = {}  # split -> "missing" / "broken" -> distinct files
        written: dict[Path, str] = {}  # image file -> case
        next_id = 0
        for split, name in files.items():
            posts = []
            for j in range(int(rng.integers(3, 9))):
                next_id += 1
                tags = random_tags(rng, int(rng.integers(1, 13)))
                names = []
                if twitter:
                    names.append((f"{next_id}.jpg", images / f"{next_id}.jpg"))
                else:  # the first post of a split has the rare counts: none, or more than 4
                    probs = [0.3, 0, 0, 0, 0, 0.4, 0.3] if j == 0 else [0.05, 0.2, 0.25, 0.2, 0.15, 0.1, 0.05]
                    for k in range(int(rng.choice(7, p=probs))):
                        if written and rng.random() < 0.1:  # an image another post names too
                            path = list(written)[rng.integers(len(written))]
                            names.append((path.name if path.parent == images else f"twitter2017-{path.name}", path))
                        elif dataset == "UNI" and rng.random() < 0.4:
                            names.append((f"twitter2017-O_{next_id}_{k}.jpg", t17 / f"O_{next_id}_{k}.jpg"))
                        else:
                            names.append((f"{next_id}_{k}.jpg", images / f"{next_id}_{k}.jpg"))
                for _, path in names:
                    if path not in written:
                        written[path] = IMAGE_CASES[rng.integers(len(IMAGE_CASES))]
                        if image_bytes(written[path]) is not None:
                            path.write_bytes(image_bytes(written[path]))
                posts.append((next_id, tags, names))
            self._write(text / name, posts, twitter)
            self.expected[split] = self._numbers(posts, written)
            seen = {path for _, _, names in posts for _, path in names[:4]}
            self.distinct[split] = Counter(KIND[CASES[written[path]][0]] for path in seen)

    def _write(self, path: Path, posts: list, twitter: bool) -> None:
        def spell(tag: str) -> str:
            return tag.replace("MISC", SPELLING[self.dataset])

        if twitter:
            blocks = [
                f"IMGID:{i}\n" + "".join(f"w{k}\t{spell(t)}\n" for k, t in enumerate(tags)) for i, tags, _ in posts
            ]
            path.write_text("\n".join(blocks))
        else:
            lines = [
                {"id": i, "text": [f"w{k}" for k in range(len(tags))], "images": [n for n, _ in names],
                 "label": [spell(t) for t in tags], "url": ""}
                for i, tags, names in posts
            ]  # fmt: skip
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    @staticmethod
    def _numbers(posts: list, written: dict[Path, str]) -> dict:
        types = Counter(t[2:] for _, tags, _ in posts for t in tags if t.startswith("B-"))
        n_images = Counter(min(len(names), 5) for _, _, names in posts)
        seen = [path for _, _, names in posts for _, path in names[:4]]
        outcome = Counter(CASES[written[path]][0] for path in seen)
        words = sum(len(tags) for _, tags, _ in posts)
        return {
            "posts": len(posts),
            "words": words,
            "words_per_post": round(words / len(posts), 2),
            "entities": {**{t: types[t] for t in TYPES}, "total": sum(types.values())},
            "entities_scored": sum(chunks(tags) for _, tags, _ in posts),
            "images_per_post": {**{str(k): n_images[k] for k in range(5)}, ">4": n_images[5]},
            "images": {
                "slots": len(seen),
                "files": len(set(seen)),
                **{kind: sum(v for k, v in outcome.items() if KIND[k] == kind) for kind in ("present", "missing")},
                "broken": outcome["undecodable"] + outcome["empty_file"],
                **{k: outcome[k] for k in ("ok", "repaired", "undecodable", "empty_file")},
                "converted": sum(CASES[written[path]][2] for path in seen),
            },
        }


def run_check(capsys, *args: str | Path) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["MI", "UNI", "twitter2015", "twitter2017"])
def test_check_counts(tmp_path, capsys, dataset):
    seed = secrets.randbelow(2**32)
    corpus = Corpus(tmp_path / "data", dataset, seed)
    out = run_check(capsys, tmp_path / "data", "--dataset", dataset, "--json", tmp_path / "r.json", "--threads", 2)
    report = json.loads((tmp_path / "r.json").read_text())
    for split, expected in corpus.expected.items():
        got = {k: v for k, v in report["splits"][split].items() if k != "examples"}
        assert got == expected, f"{split} (seed {seed})"
        found = report["splits"][split]["examples"]
        assert {k: len(v) for k, v in found.items()} == {k: min(5, corpus.distinct[split][k]) for k in found}
    total = report["total"]
    assert total["posts"] == sum(e["posts"] for e in corpus.expected.values())
    assert total["entities"]["total"] == sum(e["entities"]["total"] for e in corpus.expected.values())
    for k in ("slots", "present", "missing", "broken"):
        assert total["images"][k] == sum(e["images"][k] for e in corpus.expected.values()), f"{k} (seed {seed})"
    assert report["layout"]["image_dir_exists"]
    summary = out.strip().splitlines()[-1]
    img = total["images"]
    assert summary == (
        f"{dataset}: {total['posts']} posts, {total['entities']['total']} entities, {img['slots']} images: "
        f"{img['present']} present, {img['missing']} missing, {img['broken']} broken"
    )


def test_check_flat_layout_without_images(tmp_path, capsys):
    """A flat folder without its image folder: every image missing, and the folders looked at are named."""
    rng = np.random.default_rng(secrets.randbelow(2**32))
    n = {s: int(rng.integers(1, 6)) for s in ("train", "val", "test")}
    for split, count in n.items():
        lines = [{"id": i, "text": ["a"], "images": [f"{i}_0.jpg", f"{i}_1.jpg"], "label": ["O"]} for i in range(count)]
        (tmp_path / f"MNER-MI_{split}.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = run_check(capsys, tmp_path, "--json", tmp_path / "r.json", "--examples", 1)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [report["splits"][s]["images"]["missing"] for s in n] == [2 * c for c in n.values()]
    assert report["layout"]["split_files"]["val"] == str(tmp_path / "MNER-MI_val.txt")
    assert not report["layout"]["image_dir_exists"]
    assert f"warning: no image folder (looked at {tmp_path / 'images'})" in out
    assert f"train: {2 * n['train']} missing image(s), the first 1:\n  {tmp_path / 'images' / '0_0.jpg'}: " in out


def test_check_malformed_data(tmp_path, capsys):
    Corpus(tmp_path, "MI", secrets.randbelow(2**32))
    val = tmp_path / "text" / "MNER-MI_val.txt"
    lines = val.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["label"] = bad["label"][:-1] + ["B-THING"]
    val.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(val))}:2: unknown label 'B-THING'"):
        main([str(tmp_path)])
    (tmp_path / "text" / "MNER-MI_test.txt").unlink()
    looked = f"{tmp_path / 'MNER-MI_test.txt'}, {tmp_path / 'text' / 'MNER-MI_test.txt'}"
    with pytest.raises(SystemExit, match=rf"^error: MNER-MI_test\.txt not found \(looked at {re.escape(looked)}\)"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_check_synthetic_corpus(tmp_path, capsys):
    """The embedded corpus: every image present, and the counts of its own files."""
    from tpm_fast.data.synthetic import ensure_synthetic_corpus

    n = {"train": 12, "val": 4, "test": 5}
    data = ensure_synthetic_corpus(tmp_path, secrets.randbelow(1000), n["train"], n["val"], n["test"])
    run_check(capsys, data, "--dataset", "synthetic", "--json", tmp_path / "r.json", "--no-progress")
    report = json.loads((tmp_path / "r.json").read_text())
    for split, count in n.items():
        lines = [json.loads(line) for line in (data / f"MNER-MI_{split}.txt").read_text().splitlines()]
        got = report["splits"][split]
        assert got["posts"] == count == len(lines)
        assert got["entities"]["total"] == sum(t.startswith("B-") for post in lines for t in post["label"])
        per_post = Counter(len(p["images"]) for p in lines)
        assert got["images_per_post"] == {**{str(k): per_post[k] for k in range(5)}, ">4": 0}
        assert got["images"]["present"] == got["images"]["ok"] == sum(len(p["images"]) for p in lines)
