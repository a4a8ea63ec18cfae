from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from tpm_fast.data.images import DataWarning, ImageStats
from tpm_fast.data.readers import DataFormatError, Post, load_split, read_conll, read_mner_jsonl, resolve_layout

SHARED_TWITTER2015 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "twitter2015"


def _jsonl(path: Path, objs: list, newline: str = "\n", bom: bool = False) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o, ensure_ascii=False) for o in objs]
    data = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))
    return path


def _post(i: int, n_images: int = 2, **over) -> dict:
    obj = {
        "id": i,
        "text": ["Obama", "visits", "New", "York", "\u2028ok"],
        "images": [f"{i}_{k}.jpg" for k in range(n_images)],
        "label": ["B-PER", "O", "B-LOC", "I-LOC", "B-MIS"],
        "url": "https://example.invalid",
    }
    obj.update(over)
    return obj


@pytest.mark.parametrize("newline, bom", [("\n", False), ("\r\n", False), ("\n", True), ("\r\n", True)])
def test_read_mner_jsonl(tmp_path, newline, bom):
    path = _jsonl(tmp_path / "MNER-MI_train.txt", [_post(7), "", "   ", _post(8, n_images=0)], newline, bom)
    posts = read_mner_jsonl(path, tmp_path / "images")
    assert [p.id for p in posts] == ["7", "8"]
    p = posts[0]
    assert isinstance(p, Post)
    assert p.words == ["Obama", "visits", "New", "York", "\u2028ok"]  # U+2028 is not a line break here
    assert p.labels == ["B-PER", "O", "B-LOC", "I-LOC", "B-MISC"]
    assert p.images == [(tmp_path / "images" / "7_0.jpg").resolve(), (tmp_path / "images" / "7_1.jpg").resolve()]
    assert p.source == f"{path}:1"
    assert posts[1].images == [] and posts[1].source == f"{path}:4"


def test_read_mner_jsonl_unlabeled(tmp_path):
    obj = _post(1)
    del obj["label"]
    path = _jsonl(tmp_path / "a.txt", [obj, _post(2, label=["bogus"])])
    posts = read_mner_jsonl(path, tmp_path, labeled=False)
    assert [p.labels for p in posts] == [None, None]
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:1: missing key\(s\) \['label'\]"):
        read_mner_jsonl(path, tmp_path)


def test_twitter2017_image_rule(tmp_path):
    names = ["twitter2017-O_538.jpg", "twitter2017-16_05_01_12.jpg", "5302_0.jpg"]
    path = _jsonl(tmp_path / "MNER-UNI_val.txt", [_post(1, images=names)])
    (p,) = read_mner_jsonl(path, tmp_path / "mi", tmp_path / "t17")
    assert p.images == [
        (tmp_path / "t17" / "O_538.jpg").resolve(),
        (tmp_path / "t17" / "16_05_01_12.jpg").resolve(),
        (tmp_path / "mi" / "5302_0.jpg").resolve(),
    ]
    (p,) = read_mner_jsonl(path, tmp_path / "mi")  # no TWITTER-2017 folder: names as written
    assert p.images[0] == (tmp_path / "mi" / "twitter2017-O_538.jpg").resolve()


def test_too_many_images_kept_four_and_counted(tmp_path):
    posts = [_post(i, n_images=5 + i % 2) for i in range(8)] + [_post(99, n_images=4)]
    path = _jsonl(tmp_path / "a.txt", posts)
    stats = ImageStats()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = read_mner_jsonl(path, tmp_path, stats=stats)
    assert [len(p.images) for p in out] == [4] * 9
    assert out[0].images[-1].name == "0_3.jpg"
    assert stats.too_many == 8
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 6  # 5 individual warnings, then one suppression notice
    assert msgs[0] == f"{path}:1: post 0 has 5 images; keeping the first 4"
    assert "suppressed" in msgs[5]


@pytest.mark.parametrize(
    "line, line_no, pattern",
    [
        ('{"id": 1, "text": ["a"], ', 2, r"invalid JSON"),
        ("[1, 2]", 2, r"expected a JSON object, got list"),
        ('{"id": 1, "images": [], "label": ["O"]}', 2, r"missing key\(s\) \['text'\]"),
        ('{"id": 1, "text": ["a"], "label": ["O"]}', 2, r"missing key\(s\) \['images'\]"),
        ('{"id": 3, "text": ["a", "b"], "images": [], "label": ["O"]}', 2, r"2 words but 1 labels in post 3"),
        (
            '{"id": 3, "text": ["a", "b"], "images": [], "label": ["O", "B-FOO"]}',
            2,
            r"unknown label 'B-FOO' for word 1 \('b'\); allowed: O, or B-/I- followed by one of LOC, MIS, MISC",
        ),
        ('{"id": 4, "text": [], "images": [], "label": []}', 2, r"empty text in post 4"),
        ('{"id": 4, "text": "a b", "images": [], "label": []}', 2, r"'text' must be a list of strings"),
        ('{"id": 4, "text": ["a"], "images": "x.jpg", "label": ["O"]}', 2, r"'images' must be a list"),
        (
            '{"id": 4, "text": ["a"], "images": ["../../etc/passwd"], "label": ["O"]}',
            2,
            r"image name '\.\./\.\./etc/passwd' must be a relative path",
        ),
        (
            '{"id": 4, "text": ["a"], "images": ["/etc/passwd"], "label": ["O"]}',
            2,
            r"image name '/etc/passwd' must be a relative path",
        ),
        ('{"id": 4, "text": ["a"], "images": [3], "label": ["O"]}', 2, r"image names must be non-empty strings, got 3"),
    ],
)
def test_read_mner_jsonl_errors(tmp_path, line, line_no, pattern):
    path = _jsonl(tmp_path / "bad.txt", [_post(1), line, _post(2)], newline="\r\n")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:{line_no}: {pattern}"):
        read_mner_jsonl(path, tmp_path)


def test_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(json.dumps(_post(1)).encode() + b"\n" + b'{"id": 2, "text": ["\xff"]}\n')
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        read_mner_jsonl(path, tmp_path)


def test_data_format_error_is_value_error():
    assert issubclass(DataFormatError, ValueError)


CONLL = "IMGID:1015799\nRT\tO\nGeorge\tB-PER\nZimmerman\tI-PER\nUN\tB-ORG\n\n\nIMGID:42\nParis\tB-LOC\n#x\tB-OTHER\n"


@pytest.mark.parametrize("newline, bom", [("\n", False), ("\r\n", False), ("\r\n", True)])
def test_read_conll(tmp_path, newline, bom):
    path = tmp_path / "train.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + CONLL.replace("\n", newline).encode())
    posts = read_conll(path, tmp_path / "img")
    assert [p.id for p in posts] == ["1015799", "42"]
    assert posts[0].words == ["RT", "George", "Zimmerman", "UN"]
    assert posts[0].labels == ["O", "B-PER", "I-PER", "B-ORG"]
    assert posts[1].labels == ["B-LOC", "B-MISC"]
    assert posts[1].images == [(tmp_path / "img" / "42.jpg").resolve()]
    assert [p.source for p in posts] == [f"{path}:1", f"{path}:8"]


def test_read_conll_unlabeled(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("IMGID:5\nhello\nworld\tO\n")
    (p,) = read_conll(path, tmp_path, labeled=False)
    assert p.words == ["hello", "world"] and p.labels is None


@pytest.mark.parametrize(
    "text, line_no, pattern",
    [
        ("IMGID:1\nfoo\tO\nbar\n", 3, r"expected 'word<TAB>label', got 1 tab-separated field\(s\): 'bar'"),
        ("IMGID:1\nfoo\tO\tO\n", 2, r"expected 'word<TAB>label', got 3"),
        ("IMGID:1\nfoo\tO\n\nbar\tO\n", 4, r"missing IMGID"),
        ("foo\tO\n", 1, r"missing IMGID"),
        ("IMGID:1\nfoo\tB-THING\n", 2, r"unknown label 'B-THING' for word 'foo'; allowed: O, or B-/I-"),
        ("IMGID:1\nfoo\tO\n\nIMGID:2\n\n", 4, r"empty text in post 2"),
        ("IMGID:  \nfoo\tO\n", 1, r"empty IMGID"),
    ],
)
def test_read_conll_errors(tmp_path, text, line_no, pattern):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:{line_no}: {pattern}"):
        read_conll(path, tmp_path)


@pytest.mark.parametrize(
    "dataset, split, filename",
    [
        ("MI", "train", "MNER-MI_train.txt"),
        ("MI", "val", "MNER-MI_val.txt"),
        ("synthetic", "test", "MNER-MI_test.txt"),
        ("UNI", "val", "MNER-UNI_val.txt"),
        ("twitter2015", "val", "valid.txt"),
        ("twitter2017", "valid", "valid.txt"),
        ("twitter2017", "test", "test.txt"),
    ],
)
def test_load_split_layouts(tmp_path, dataset, split, filename):
    if dataset in ("twitter2015", "twitter2017"):
        (tmp_path / filename).write_text("IMGID:9\nhi\tO\n")
    else:
        _jsonl(tmp_path / filename, [_post(9, images=["9_0.jpg", "twitter2017-a_1.jpg"])])
    (p,) = load_split(tmp_path, dataset, split)
    assert p.id == "9"
    first = "9.jpg" if dataset.startswith("twitter") else "9_0.jpg"
    assert p.images[0] == (tmp_path / "images" / first).resolve()
    if dataset == "UNI":
        assert p.images[1] == (tmp_path / "twitter2017_images" / "a_1.jpg").resolve()
        (p,) = load_split(tmp_path, dataset, split, image_dir=tmp_path / "x", twitter2017_image_dir=tmp_path / "y")
        assert p.images == [(tmp_path / "x" / "9_0.jpg").resolve(), (tmp_path / "y" / "a_1.jpg").resolve()]


def test_load_split_errors(tmp_path):
    looked = f"looked at {tmp_path / 'MNER-MI_val.txt'}, {tmp_path / 'text' / 'MNER-MI_val.txt'}"
    with pytest.raises(FileNotFoundError) as e:
        load_split(tmp_path, "MI", "val")
    expects = "dataset 'MI' expects MNER-MI_train.txt, MNER-MI_val.txt, MNER-MI_test.txt"
    assert str(e.value) == f"MNER-MI_val.txt not found ({looked}): {expects}"
    looked = f"looked at {tmp_path / 'valid.txt'}, {tmp_path / 'twitter2015' / 'valid.txt'}"
    with pytest.raises(FileNotFoundError, match=rf"^valid\.txt not found \({re.escape(looked)}\): dataset 'twit"):
        load_split(tmp_path, "twitter2015", "val")
    with pytest.raises(ValueError, match="unknown dataset 'MNER'"):
        load_split(tmp_path, "MNER", "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split(tmp_path, "MI", "dev")


def _write_split(path: Path, dataset: str, split: str, post_id: int) -> None:
    """One post (id ``post_id``) in the format of ``dataset``; MNER posts name an MI and a TWITTER-2017 image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if dataset.startswith("twitter"):
        path.write_text(f"IMGID:{post_id}\n{split}\tO\n")
    else:
        _jsonl(path, [_post(post_id, images=[f"{post_id}_0.jpg", f"twitter2017-t_{post_id}.jpg"])])


@pytest.mark.parametrize("dataset", ["MI", "UNI", "synthetic"])
def test_load_split_authors_layout(tmp_path, dataset):
    """The authors' Dataset/ folder as downloaded: text/MNER-{MI,UNI}_*.txt, images/, twitter2017_images/."""
    stem = "MNER-UNI" if dataset == "UNI" else "MNER-MI"
    root = tmp_path / "Dataset"
    for k, split in enumerate(("train", "val", "test")):
        _write_split(root / "text" / f"{stem}_{split}.txt", dataset, split, 100 + k)
    (root / "images").mkdir()
    (root / "twitter2017_images").mkdir()
    for i, split in enumerate(("train", "val", "test"), start=100):
        (p,) = load_split(root, dataset, split)
        assert p.id == str(i) and p.source == f"{root / 'text' / f'{stem}_{split}.txt'}:1"
        assert p.images[0] == (root / "images" / f"{i}_0.jpg").resolve()
        t17 = ("twitter2017_images", f"t_{i}.jpg") if dataset == "UNI" else ("images", f"twitter2017-t_{i}.jpg")
        assert p.images[1] == root.joinpath(*t17).resolve()
    layout = resolve_layout(root, dataset)
    assert layout.split_file("valid") == root / "text" / f"{stem}_val.txt"
    assert layout.image_dir == root / "images"
    # a flat file in the top folder wins over text/
    _write_split(root / f"{stem}_val.txt", dataset, "val", 7)
    assert [p.id for p in load_split(root, dataset, "val")] == ["7"]


@pytest.mark.parametrize("dataset", ["twitter2015", "twitter2017"])
@pytest.mark.parametrize("point_at", ["data", "text"])
def test_load_split_umt_layout(tmp_path, dataset, point_at):
    """UMT's data/ folder: data/<dataset>/{train,valid,test}.txt beside data/<dataset>_images/."""
    data = tmp_path / "data"
    for k, name in enumerate(("train.txt", "valid.txt", "test.txt")):
        _write_split(data / dataset / name, dataset, name, 50 + k)
    (data / f"{dataset}_images").mkdir()
    root = data if point_at == "data" else data / dataset  # --data-dir data or data/twitter2015: both work
    for k, split in enumerate(("train", "val", "test")):
        (p,) = load_split(root, dataset, split)
        assert p.id == str(50 + k)
        assert p.images == [(data / f"{dataset}_images" / f"{50 + k}.jpg").resolve()]
    layout = resolve_layout(root, dataset)
    assert layout.image_dir == data / f"{dataset}_images"
    assert layout.image_dirs_tried == (root / "images", root / f"{dataset}_images", root.parent / f"{dataset}_images")
    (root / "images").mkdir()  # the flat layout's folder comes first
    assert load_split(root, dataset, "test")[0].images == [(root / "images" / "52.jpg").resolve()]
    given = tmp_path / "elsewhere"
    assert load_split(root, dataset, "test", image_dir=given)[0].images == [(given / "52.jpg").resolve()]
    assert resolve_layout(root, dataset, image_dir=given).image_dirs_tried == (given,)


def test_resolve_layout_without_images(tmp_path):
    """No image folder anywhere: the flat default, which the caller may warn about."""
    for dataset in ("MI", "twitter2015"):
        layout = resolve_layout(tmp_path, dataset)
        assert layout.image_dir == tmp_path / "images" and not layout.image_dir.exists()
        assert layout.twitter2017_image_dir is None
    assert resolve_layout(tmp_path, "UNI").twitter2017_image_dir == tmp_path / "twitter2017_images"
    with pytest.raises(ValueError, match="unknown dataset 'MNER'"):
        resolve_layout(tmp_path, "MNER")


TWITTER2015_COUNTS = {
    "train": (4000, {"B-PER": 2217, "B-LOC": 2091, "B-ORG": 927, "B-MISC": 931, "I-PER": 1552, "I-LOC": 902,
                     "I-ORG": 451, "I-MISC": 834, "O": 54534}),
    "val": (1000, {"B-PER": 552, "B-LOC": 522, "B-ORG": 247, "B-MISC": 220, "I-PER": 402, "I-LOC": 215,
                   "I-ORG": 109, "I-MISC": 222, "O": 13689}),
    "test": (3257, {"B-PER": 1816, "B-LOC": 1697, "B-ORG": 839, "B-MISC": 720, "I-PER": 1290, "I-LOC": 685,
                    "I-ORG": 365, "I-MISC": 716, "O": 44694}),
}  # fmt: skip


@pytest.mark.skipif(not SHARED_TWITTER2015.is_dir(), reason=f"real TWITTER-2015 data not found at {SHARED_TWITTER2015}")
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_real_twitter2015(split):
    n_posts, counts = TWITTER2015_COUNTS[split]
    posts = load_split(SHARED_TWITTER2015, "twitter2015", split)
    assert len(posts) == n_posts
    assert Counter(t for p in posts for t in p.labels) == counts
    assert len({p.id for p in posts}) == n_posts
    assert all(len(p.images) == 1 and p.images[0].name == f"{p.id}.jpg" for p in posts)
    assert all(w for p in posts for w in p.words)
