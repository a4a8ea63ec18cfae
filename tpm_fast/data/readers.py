"""Readers for the MNER-MI JSON-lines files and the TWITTER-2015/2017 CoNLL files.

Every reader returns a list of :class:`Post`; :func:`load_split` reads one split of a dataset folder laid out flat or
as its authors distribute it (:func:`resolve_layout`). Bad input raises :class:`DataFormatError` whose message
starts with ``"<file>:<line>: "``. Files may use CRLF line ends and may start with a UTF-8 byte order mark. Lines
are split on ``"\\n"`` only (tweets may contain U+2028 and other characters that ``str.splitlines`` would split on).

A post with more than :data:`~tpm_fast.data.images.MAX_IMAGES` images keeps the first four; each such post is counted
in ``ImageStats.too_many`` (pass ``stats=`` to collect the count) and warned about (first few per kind, then a
suppression notice; see :class:`~tpm_fast.data.images.ImageStats`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tpm_fast.data.images import MAX_IMAGES, ImageStats
from tpm_fast.data.labels import ALLOWED_LABELS_TEXT, normalize_label

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("MI", "UNI", "twitter2015", "twitter2017", "synthetic")
SPLITS: tuple[str, ...] = ("train", "val", "test")
TWITTER_DATASETS: tuple[str, ...] = ("twitter2015", "twitter2017")
TWITTER2017_PREFIX = "twitter2017-"


class DataFormatError(ValueError):
    """Malformed input data; the message starts with ``"<file>:<line>: "``."""


@dataclass
class Post:
    """One post (tweet) with its words, tags and image paths.

    Attributes:
        id: the post id as a string.
        words: the words of the post (never empty).
        labels: normalized tags (same length as words), or None when read unlabeled.
        images: 0..4 resolved image paths; a path may not exist (the image loader leaves that slot empty).
        source: ``"file:line"`` where the post starts, for messages.
    """

    id: str
    words: list[str]
    labels: list[str] | None
    images: list[Path]
    source: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its end) for a UTF-8 file (BOM and CRLF tolerated)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        yield i, line[:-1] if line.endswith("\r") else line


def _normalize_tags(tags: list[str], words: list[str], where: str) -> list[str]:
    out = []
    for k, tag in enumerate(tags):
        try:
            out.append(normalize_label(tag.strip()))
        except ValueError:
            raise DataFormatError(
                f"{where}: unknown label {tag!r} for word {k} ({words[k]!r}); allowed: {ALLOWED_LABELS_TEXT}"
            ) from None
    return out


def _check_image_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise DataFormatError(f"{where}: image names must be non-empty strings, got {name!r}")
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or ".." in pure.parts or pure.drive:
            raise DataFormatError(f"{where}: image name {name!r} must be a relative path inside the image folder")
    return name


def _keep_first_images(names: list, post_id: str, where: str, stats: ImageStats) -> list:
    if len(names) > MAX_IMAGES:
        stats.count(
            "too_many",
            f"{where}: post {post_id} has {len(names)} images; keeping the first {MAX_IMAGES}",
            n=1,
        )
        return names[:MAX_IMAGES]
    return names


def read_mner_jsonl(
    path: str | Path,
    image_dir: str | Path,
    twitter2017_image_dir: str | Path | None = None,
    labeled: bool = True,
    *,
    stats: ImageStats | None = None,
) -> list[Post]:
    """Read an MNER-MI / MNER-UNI (MNER-MI-Plus) JSON-lines file.

    Each non-blank line is ``{"id", "text": [words], "images": [names], "label": [tags], "url"}``.
    Image names starting with ``"twitter2017-"`` (MNER-UNI) resolve to ``twitter2017_image_dir / <part after the
    first "-">``, e.g. ``"twitter2017-O_538.jpg"`` -> ``twitter2017_image_dir / "O_538.jpg"``; when
    ``twitter2017_image_dir`` is None they resolve to ``image_dir / <name as written>``.

    Args:
        path: the JSON-lines file.
        image_dir: folder of the MNER-MI images.
        twitter2017_image_dir: folder of the TWITTER-2017 images (MNER-UNI only).
        labeled: read and validate ``"label"``; when False labels are None and ``"label"`` is ignored.
        stats: counters to add ``too_many`` to (a private one is used when None).

    Returns:
        The posts in file order (blank lines skipped).

    Raises:
        DataFormatError: ``"file:line: ..."`` for invalid JSON, a missing key, empty text, non-string words,
            word/label count mismatch, unknown label, a bad image list.
    """
    path = Path(path)
    image_dir = Path(image_dir)
    t17_dir = None if twitter2017_image_dir is None else Path(twitter2017_image_dir)
    stats = ImageStats() if stats is None else stats
    required = ("id", "text", "images") + (("label",) if labeled else ())
    posts: list[Post] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise DataFormatError(f"{where}: missing key(s) {missing}; present: {sorted(obj)}")
        post_id = str(obj["id"])
        words = obj["text"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataFormatError(f"{where}: 'text' must be a list of strings")
        if not words:
            raise DataFormatError(f"{where}: empty text in post {post_id}")
        labels = None
        if labeled:
            tags = obj["label"]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise DataFormatError(f"{where}: 'label' must be a list of strings")
            if len(tags) != len(words):
                raise DataFormatError(f"{where}: {len(words)} words but {len(tags)} labels in post {post_id}")
            labels = _normalize_tags(tags, words, where)
        names = obj["images"]
        if not isinstance(names, list):
            raise DataFormatError(f"{where}: 'images' must be a list of file names")
        names = [_check_image_name(n, where) for n in _keep_first_images(names, post_id, where, stats)]
        images = []
        for name in names:
            if t17_dir is not None and name.startswith(TWITTER2017_PREFIX):
                images.append((t17_dir / name.split("-", 1)[1]).resolve())
            else:
                images.append((image_dir / name).resolve())
        posts.append(Post(id=post_id, words=words, labels=labels, images=images, source=where))
    logger.debug("read %d posts from %s", len(posts), path)
    return posts


def read_conll(path: str | Path, image_dir: str | Path, labeled: bool = True) -> list[Post]:
    """Read a TWITTER-2015 / TWITTER-2017 CoNLL file.

    Posts are blocks separated by blank lines; a block's first line is ``IMGID:<id>``, then one ``word<TAB>tag``
    per line (``word`` alone is accepted when ``labeled`` is False). The image is ``image_dir / "<id>.jpg"``.

    Args:
        path: the CoNLL file.
        image_dir: folder of the images.
        labeled: read and validate tags; when False labels are None and tags are ignored.

    Returns:
        The posts in file order, each with one image path.

    Raises:
        DataFormatError: ``"file:line: ..."`` for a block without ``IMGID:``, an empty id, a post without words,
            a line without a tab (or with more than one), an unknown label.
    """
    path = Path(path)
    image_dir = Path(image_dir)
    posts: list[Post] = []
    block: list[tuple[int, str]] = []

    def flush() -> None:
        if not block:
            return
        first_no, first = block[0]
        where = f"{path}:{first_no}"
        if not first.startswith("IMGID:"):
            raise DataFormatError(f"{where}: missing IMGID (a post must start with 'IMGID:<id>'), got {first[:50]!r}")
        post_id = first[len("IMGID:") :].strip()
        if not post_id:
            raise DataFormatError(f"{where}: empty IMGID")
        if len(block) == 1:
            raise DataFormatError(f"{where}: empty text in post {post_id}")
        words, tags = [], []
        for lineno, line in block[1:]:
            fields = line.split("\t")
            if len(fields) == 1 and not labeled:
                fields = [line, ""]
            if len(fields) != 2:
                got = f"got {len(fields)} tab-separated field(s): {line[:50]!r}"
                raise DataFormatError(f"{path}:{lineno}: expected 'word<TAB>label', {got}")
            words.append(fields[0])
            tags.append(fields[1])
            if labeled:
                try:
                    tags[-1] = normalize_label(fields[1].strip())
                except ValueError:
                    raise DataFormatError(
                        f"{path}:{lineno}: unknown label {fields[1]!r} for word {fields[0]!r}; "
                        f"allowed: {ALLOWED_LABELS_TEXT}"
                    ) from None
        image = (image_dir / f"{post_id}.jpg").resolve()
        posts.append(Post(id=post_id, words=words, labels=tags if labeled else None, images=[image], source=where))
        block.clear()

    for lineno, line in _lines(path):
        if line.strip():
            block.append((lineno, line))
        else:
            flush()
    flush()
    logger.debug("read %d posts from %s", len(posts), path)
    return posts


def read_text_posts(path: str | Path, image_dir: str | Path, *, stats: ImageStats | None = None) -> list[Post]:
    """Read raw text: one post per line, words split on whitespace (tokenized as the training data is).

    A line may name the post's images after a TAB: ``words of the post<TAB>a.jpg b.jpg`` (names relative to
    ``image_dir``, separated by spaces, at most :data:`~tpm_fast.data.images.MAX_IMAGES` kept); without a TAB the post
    has no images. The post id is the line number, so output maps back to the input even though blank lines are
    skipped.

    Args:
        path: the text file (UTF-8; BOM and CRLF tolerated).
        image_dir: folder the image names are relative to.
        stats: counters to add ``too_many`` to (a private one is used when None).

    Returns:
        The posts in file order, unlabeled (``labels`` None), with ids ``"1"``, ``"2"``, ... (line numbers).

    Raises:
        DataFormatError: ``"file:line: ..."`` for a line with images but no words, more than one TAB, or an image
            name that leaves the image folder.
    """
    path, image_dir = Path(path), Path(image_dir)
    stats = ImageStats() if stats is None else stats
    posts: list[Post] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = line.split("\t")
        if len(fields) > 2:
            raise DataFormatError(f"{where}: expected 'words' or 'words<TAB>images', got {len(fields)} TAB fields")
        words = fields[0].split()
        if not words:
            raise DataFormatError(f"{where}: images but no words")
        names = fields[1].split() if len(fields) == 2 else []
        names = [_check_image_name(n, where) for n in _keep_first_images(names, str(lineno), where, stats)]
        images = [(image_dir / name).resolve() for name in names]
        posts.append(Post(id=str(lineno), words=words, labels=None, images=images, source=where))
    logger.debug("read %d posts from %s", len(posts), path)
    return posts


SPLIT_FILES: dict[str, dict[str, str]] = {
    **{d: {s: f"MNER-MI_{s}.txt" for s in SPLITS} for d in ("MI", "synthetic")},
    "UNI": {s: f"MNER-UNI_{s}.txt" for s in SPLITS},
    **{d: {"train": "train.txt", "val": "valid.txt", "test": "test.txt"} for d in TWITTER_DATASETS},
}
"""Dataset -> split -> file name of the split."""


@dataclass(frozen=True)
class Layout:
    """Where a dataset's split files and image folders are (see :func:`resolve_layout`).

    Attributes:
        dataset: one of ``DATASETS``.
        text_dirs: the folders searched for the split files, in order (the first holding a split's file wins).
        image_dir: the image folder (it may not exist: every image slot then stays empty).
        image_dirs_tried: the image folders looked for, in order (just the one given when it was given).
        twitter2017_image_dir: the TWITTER-2017 image folder of ``UNI`` (None for the other datasets).
    """

    dataset: str
    text_dirs: tuple[Path, ...]
    image_dir: Path
    image_dirs_tried: tuple[Path, ...]
    twitter2017_image_dir: Path | None = None

    def split_file(self, split: str) -> Path:
        """The file of ``split`` (``"train"``, ``"val"`` or ``"valid"``, ``"test"``).

        Raises:
            ValueError: unknown split.
            FileNotFoundError: in none of ``text_dirs``; the message names every path looked at.
        """
        split = "val" if split == "valid" else split
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        name = SPLIT_FILES[self.dataset][split]
        for folder in self.text_dirs:
            if (folder / name).is_file():
                return folder / name
        looked = ", ".join(str(folder / name) for folder in self.text_dirs)
        expects = ", ".join(SPLIT_FILES[self.dataset].values())
        raise FileNotFoundError(f"{name} not found (looked at {looked}): dataset {self.dataset!r} expects {expects}")


def resolve_layout(
    data_dir: str | Path,
    dataset: str,
    image_dir: str | Path | None = None,
    twitter2017_image_dir: str | Path | None = None,
) -> Layout:
    """Find a dataset's files in ``data_dir``, laid out flat or as its authors distribute it.

    Split files (:data:`SPLIT_FILES`) are looked for in ``data_dir`` first, then in ``data_dir/text``
    (``MI``, ``UNI``, ``synthetic``: the authors' ``Dataset/`` folder) or ``data_dir/<dataset>`` (TWITTER: UMT's
    ``data/`` folder holding ``twitter2015/`` and ``twitter2017/``). Image folders, unless given: ``data_dir/images``
    (and ``data_dir/twitter2017_images`` for ``UNI``); for TWITTER the first existing of ``data_dir/images``,
    ``data_dir/<dataset>_images`` and ``data_dir/../<dataset>_images`` (UMT's image folders sit beside the text
    folders), else ``data_dir/images``. Only the folders are looked at here; the split files when they are asked for.

    Args:
        data_dir: the dataset folder.
        dataset: one of ``DATASETS``.
        image_dir: the image folder, overriding the search.
        twitter2017_image_dir: the TWITTER-2017 image folder of ``UNI``, overriding the default.

    Returns:
        The layout.

    Raises:
        ValueError: unknown dataset.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    data_dir = Path(data_dir)
    twitter = dataset in TWITTER_DATASETS
    text_dirs = (data_dir, data_dir / (dataset if twitter else "text"))
    if image_dir is not None:
        tried: tuple[Path, ...] = (Path(image_dir),)
    elif twitter:
        tried = (data_dir / "images", data_dir / f"{dataset}_images", data_dir.parent / f"{dataset}_images")
    else:
        tried = (data_dir / "images",)
    found = next((d for d in tried if d.is_dir()), tried[0])
    t17 = None
    if dataset == "UNI":
        t17 = Path(twitter2017_image_dir) if twitter2017_image_dir is not None else data_dir / "twitter2017_images"
    return Layout(dataset, text_dirs, found, tried, t17)


def load_split(
    data_dir: str | Path,
    dataset: str,
    split: str,
    image_dir: str | Path | None = None,
    twitter2017_image_dir: str | Path | None = None,
    *,
    labeled: bool = True,
    stats: ImageStats | None = None,
) -> list[Post]:
    """Load one split of a dataset, its files laid out flat or as distributed (see :func:`resolve_layout`).

    Split files: ``MI`` and ``synthetic``: ``MNER-MI_{split}.txt``; ``UNI``: ``MNER-UNI_{split}.txt`` (images
    named ``twitter2017-*`` in the TWITTER-2017 image folder); ``twitter2015`` / ``twitter2017``:
    ``{train,valid,test}.txt`` (``"val"`` -> ``valid.txt``).

    Args:
        data_dir: the dataset folder.
        dataset: one of ``DATASETS``.
        split: ``"train"``, ``"val"`` (``"valid"`` accepted) or ``"test"``.
        image_dir: overrides the image folder search.
        twitter2017_image_dir: overrides the default TWITTER-2017 image folder (UNI only).
        labeled: see the readers.
        stats: counters for dropped extra images (JSON-lines layouts).

    Returns:
        The posts of the split.

    Raises:
        ValueError: unknown dataset or split.
        FileNotFoundError: the split file is missing (names every path looked at and the files expected).
        DataFormatError: malformed data (``"file:line: ..."``).
    """
    layout = resolve_layout(data_dir, dataset, image_dir, twitter2017_image_dir)
    path = layout.split_file(split)
    if dataset in TWITTER_DATASETS:
        return read_conll(path, layout.image_dir, labeled=labeled)
    return read_mner_jsonl(path, layout.image_dir, layout.twitter2017_image_dir, labeled=labeled, stats=stats)
