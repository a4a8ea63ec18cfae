"""The shareable export of a trained TPM-MI: one folder that loads offline, anywhere, with no training files.

``save_pretrained(model, DIR, ...)`` writes

- ``config.json``: the format name and version, the model config (:class:`tpm_fast.model.TPMConfig`, the HF BERT and
  ViT configs inside), ``max_seq_length``, the image settings (:class:`tpm_fast.data.images.ImageSpec`), the training
  step and epoch the weights come from, and the model card's facts (``card``);
- ``model.safetensors``: the fp32 weights (safetensors: no pickle, loadable without tpm-fast);
- the tokenizer's files (``tokenizer.save_pretrained``: ``tokenizer_config.json``, ``tokenizer.json``, ...);
- ``preprocessor_config.json``: the image settings as a ``ViTImageProcessor`` reads them (resize, rescale, normalize);
- ``README.md``: the model card (data, recipe, seeds, dev/test scores) rendered from ``card``.

The folder is written under a temporary name beside ``DIR`` and renamed into place when complete; an existing export
at ``DIR`` is moved aside only then, and removed after the rename. :func:`load_pretrained` reads it offline, checks the
format version (a newer one than this code knows is refused with a message), and also reads the legacy single-file
``best_model.pt`` of tpm-fast 0.2 (``tokenizer/`` beside it), which ``python -m tpm_fast.export convert`` turns into
an export folder:

    python -m tpm_fast.export convert runs/default/best_model.pt runs/default/best_model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tpm_fast.data.images import ImageSpec
from tpm_fast.model import TPMMI, TPMConfig, load_model
from tpm_fast.model_card import render_card

logger = logging.getLogger(__name__)

FORMAT = "tpm-fast"
"""``config.json``'s ``format``: tells a tpm-fast export from an HF model folder."""
FORMAT_VERSION = 1
"""Version of the folder layout and ``config.json`` keys; bumped when an older reader could misread a newer export."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
LEGACY_TOKENIZER = "tokenizer"
CONVERT_HINT = "python -m tpm_fast.export convert {path} OUT_DIR"


@dataclass
class Exported:
    """Everything inference needs, as :func:`load_pretrained` returns it.

    Attributes:
        model: the model in eval mode on the requested device (fp32 weights).
        tokenizer: the HF fast tokenizer it was trained with.
        image_spec: the ViT input geometry and normalization it was trained with.
        max_seq_length: word pieces per post (special tokens included) it was trained with.
        info: the export's ``config.json`` (for a legacy file: the same keys, built from it, ``format_version`` 0).
    """

    model: TPMMI
    tokenizer: object
    image_spec: ImageSpec
    max_seq_length: int
    info: dict


def preprocessor_config(spec: ImageSpec) -> dict:
    """The ``preprocessor_config.json`` of ``spec``: the keys a ``ViTImageProcessor`` writes and reads (bilinear square
    resize, rescale, normalize); :meth:`ImageSpec.from_pretrained` (through ``AutoImageProcessor``) reads it back to
    ``spec``."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": spec.size, "width": spec.size},
        "resample": 2,  # PIL.Image.Resampling.BILINEAR, what every loader does
        "do_rescale": True,
        "rescale_factor": spec.rescale,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
    }


def save_pretrained(
    model: TPMMI,
    directory: str | Path,
    *,
    tokenizer,
    image_spec: ImageSpec,
    max_seq_length: int,
    state_dict: dict[str, torch.Tensor] | None = None,
    card: dict | None = None,
    training: dict | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write the export folder ``directory`` atomically (complete, or the previous export left as it was).

    Args:
        model: the model (its config is saved; its weights too unless ``state_dict`` is given).
        directory: the export folder; an existing one is replaced once the new one is complete.
        tokenizer: the HF tokenizer the model was trained with (``save_pretrained`` writes its files).
        image_spec: the ViT input settings the model was trained with.
        max_seq_length: word pieces per post, special tokens included.
        state_dict: weights to save instead of ``model.state_dict()`` (e.g. a checkpoint's fp32 master weights);
            floating tensors are saved as fp32.
        card: the model card's facts, rendered into ``README.md`` and kept in ``config.json``: ``data`` (dict or
            text), ``recipe`` (dict), ``seeds`` (list), ``scores`` (``{"dev": {...}, "test": {...}}`` with
            ``precision`` / ``recall`` / ``f1`` in [0, 1]); other keys are listed as they are.
        training: where the weights come from (``{"step": N, "epoch": E}``), kept in ``config.json``.
        files: more files to copy into the folder, by name (e.g. ``{"run.json": OUTPUT/run.json}``, the run record).

    Returns:
        ``directory`` as a Path.

    Raises:
        ValueError: a name in ``files`` that is one of the export's own files or not a plain file name.
    """
    own = (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, CARD_FILE)
    for name in files or {}:
        if name in own or Path(name).name != name or name.startswith("tokenizer"):
            raise ValueError(f"save_pretrained: cannot add a file named {name!r} (the export's own, or not a name)")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        weights = {k: _fp32(v) for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tpm_fast_version": _version(),
            "model": dataclasses.asdict(model.config),
            "max_seq_length": int(max_seq_length),
            "image": dataclasses.asdict(image_spec),
            "training": dict(training or {}),
            "card": dict(card or {}),
        }
        _write_json(tmp / CONFIG_FILE, info)
        _write_json(tmp / PREPROCESSOR_FILE, preprocessor_config(image_spec))
        (tmp / CARD_FILE).write_text(render_card(info), encoding="utf-8")
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        for path in tmp.iterdir():
            _fsync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_folder(tmp, directory)
    return directory


def _fp32(value: torch.Tensor) -> torch.Tensor:
    """A weight as saved: detached, on the CPU, contiguous, fp32 if floating."""
    return (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()


def _replace_folder(new: Path, directory: Path) -> None:
    """Rename the complete folder ``new`` to ``directory``; an old ``directory`` is moved aside first, then removed
    (killed in between: the old export is in ``.NAME.old-*`` beside it)."""
    old = None
    if directory.exists() or directory.is_symlink():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        _remove(old)
        directory.replace(old)
    new.replace(directory)
    _fsync(directory.parent)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def update_card(directory: str | Path, card: dict) -> dict:
    """Merge ``card`` into an export's model card (e.g. the test scores once the final test has run); ``scores`` are
    merged per split. ``config.json`` and ``README.md`` are each replaced atomically.

    Returns:
        The merged card.
    """
    directory = Path(directory)
    info = read_info(directory)
    merged = dict(info.get("card", {}))
    for key, value in card.items():
        merged[key] = {**merged.get(key, {}), **value} if key == "scores" else value
    info["card"] = merged
    _write_json(directory / CONFIG_FILE, info, atomic=True)
    _write_text_atomically(directory / CARD_FILE, render_card(info))
    return merged


def read_info(directory: str | Path) -> dict:
    """An export's ``config.json``, checked: the tpm-fast format, of a version this code reads.

    Raises:
        FileNotFoundError: ``directory`` is no export folder (no ``config.json``); says how to convert a legacy file.
        ValueError: naming the file: unreadable JSON, another format (e.g. an HF model folder), a newer version.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: not a tpm-fast export (no {CONFIG_FILE}); a legacy best_model.pt converts with "
            + CONVERT_HINT.format(path="best_model.pt")
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{path}: not a tpm-fast export (format {found!r}, expected {FORMAT!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format version {version} is newer than this tpm-fast {_version()} reads "
            f"(up to {FORMAT_VERSION}): upgrade tpm-fast to load it"
        )
    return info


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Exported:
    """Load an export folder offline (nothing is downloaded), or a legacy ``best_model.pt`` file.

    Args:
        path: an export folder (:func:`save_pretrained`), or a legacy ``best_model.pt`` (``tokenizer/`` beside it;
            loaded with a warning saying how to convert it).
        device: where the model goes.

    Returns:
        The :class:`Exported` model (eval mode), tokenizer, image settings, max length and config.

    Raises:
        FileNotFoundError: no such folder or file, or a file missing from the export.
        ValueError: naming the file: another format, a newer format version, weights that do not fit the config.
    """
    path = Path(path)
    if path.is_file():
        return _load_legacy(path, device)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such export folder (or legacy best_model.pt file)")
    info = read_info(path)
    try:
        config = TPMConfig(**info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: bad model config ({e})") from None
    model = TPMMI(config)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        model.load_state_dict(load_file(weights_path))
    except RuntimeError as e:
        raise ValueError(f"{weights_path}: the weights do not fit {path / CONFIG_FILE} ({e})") from None
    spec = ImageSpec(**info["image"])
    return Exported(model.to(device).eval(), _tokenizer(path), spec, int(info["max_seq_length"]), info)


def _load_legacy(path: Path, device: str | torch.device) -> Exported:
    """A tpm-fast 0.2 ``best_model.pt`` (a torch.save dict: config, state_dict, image_spec, max_seq_length, epoch,
    step) with ``tokenizer/`` beside it."""
    try:
        model, blob = load_model(path, device)
    except Exception as e:  # noqa: BLE001 - any unpickling / key error: say what the file should be
        raise ValueError(
            f"{path}: neither an export folder nor a legacy best_model.pt ({type(e).__name__}: {e}); "
            "give the export folder train.py writes (OUTPUT/best_model)"
        ) from None
    logger.warning("%s is a legacy best_model.pt; convert it to an export folder with %s", path,
                   CONVERT_HINT.format(path=path))  # fmt: skip
    tokenizer_dir = path.parent / LEGACY_TOKENIZER
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{path}: a legacy best_model.pt needs its {tokenizer_dir} folder beside it")
    spec = ImageSpec(**blob.get("image_spec", {}))
    max_len = int(blob.get("max_seq_length", 128))
    training = {k: blob[k] for k in ("step", "epoch") if k in blob}
    info = {
        "format": FORMAT,
        "format_version": 0,
        "model": blob["config"],
        "max_seq_length": max_len,
        "image": dataclasses.asdict(spec),
        "training": training,
        "card": {},
    }
    return Exported(model, _tokenizer(tokenizer_dir), spec, max_len, info)


def convert(legacy: str | Path, directory: str | Path, card: dict | None = None) -> Path:
    """Turn a legacy ``best_model.pt`` (``tokenizer/`` beside it) into an export folder with the same weights.

    Returns:
        ``directory`` as a Path.
    """
    old = _load_legacy(Path(legacy), "cpu")
    return save_pretrained(old.model, directory, tokenizer=old.tokenizer, image_spec=old.image_spec,
                           max_seq_length=old.max_seq_length, card=card, training=old.info["training"])  # fmt: skip


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _version() -> str:
    from tpm_fast import __version__

    return __version__


def _write_json(path: Path, value: dict, atomic: bool = False) -> None:
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"  # str: paths and such in a card
    if atomic:
        _write_text_atomically(path, text)
    else:
        path.write_text(text, encoding="utf-8")


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    tmp.replace(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """``python -m tpm_fast.export convert LEGACY.pt OUT_DIR`` (and ``show DIR``: print an export's config)."""
    p = argparse.ArgumentParser(prog="python -m tpm_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="turn a legacy best_model.pt (tokenizer/ beside it) into an export folder")
    c.add_argument("legacy", help="the legacy best_model.pt")
    c.add_argument("output", help="the export folder to write")
    s = sub.add_parser("show", help="print an export's config.json (checked)")
    s.add_argument("directory")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            print(f"wrote {convert(args.legacy, args.output)}")
        else:
            print(json.dumps(read_info(args.directory), indent=2, sort_keys=True))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
