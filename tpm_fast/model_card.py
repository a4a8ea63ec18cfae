"""The model card (``README.md``) of an export folder, rendered from its ``config.json`` (:mod:`tpm_fast.export`)."""

from __future__ import annotations


def render_card(info: dict) -> str:
    """The ``README.md`` model card of an export's ``config.json`` (its ``card`` facts, model and format)."""
    card, cfg = info.get("card", {}), info["model"]
    bert, scores = cfg.get("bert", {}), card.get("scores", {})
    lines = [
        "---",
        "library_name: tpm-fast",
        "pipeline_tag: token-classification",
        "tags: [ner, multimodal, tpm-mi, crf]",
        "---",
        "",
        f"# TPM-MI ({cfg['image_mode']}) exported by tpm-fast",
        "",
        "Multimodal named-entity recognition on social-media posts with up to 4 images: BERT with per-layer image",
        "prefix keys/values (ViT + temporal Transformer) and a CRF (TPM-MI, MNER-MI paper, LREC-COLING 2024).",
        "",
        "## Model",
        "",
        f"- image mode: `{cfg['image_mode']}`; image padding `{cfg['image_padding']}`; image feature "
        f"`{cfg['image_feature']}`",
        f"- BERT: {bert.get('num_hidden_layers', '?')} layers, hidden size {bert.get('hidden_size', '?')}, "
        f"vocabulary {bert.get('vocab_size', '?')}; max {info['max_seq_length']} word pieces per post",
        f"- labels: {', '.join(cfg['labels'])}",
        f"- images: {info['image']['size']} x {info['image']['size']} pixels, mean {list(info['image']['mean'])}, "
        f"std {list(info['image']['std'])}",
    ]
    training = info.get("training", {})
    if training:
        lines.append("- weights from training " + ", ".join(f"{k} {v}" for k, v in sorted(training.items())))
    lines += ["", "## Scores", "", "Entity-level micro scores (seqeval, first word pieces).", ""]
    lines += ["| split | precision | recall | F1 |", "|---|---|---|---|"]
    for split in ("dev", "test"):
        s = scores.get(split)
        row = [_percent(s.get(k)) for k in ("precision", "recall", "f1")] if s else ["pending"] * 3
        lines.append(f"| {split} | " + " | ".join(row) + " |")
    for title, key in (("Data", "data"), ("Recipe", "recipe"), ("Seeds", "seeds")):
        lines += ["", f"## {title}", "", _describe(card.get(key, "not recorded"))]
    others = {k: v for k, v in card.items() if k not in ("data", "recipe", "seeds", "scores")}
    if others:
        lines += ["", "## More", "", _describe(others)]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from tpm_fast.export import load_pretrained",
        "",
        'exported = load_pretrained("THIS_FOLDER")  # model, tokenizer, image_spec, max_seq_length; offline',
        "```",
        "",
        "```bash",
        "tpm-predict --model THIS_FOLDER --input posts.jsonl --image-dir IMAGES --output entities.jsonl",
        "```",
        "",
        f"Format `{info['format']}` version {info['format_version']} (tpm-fast {info.get('tpm_fast_version', '?')}).",
        "",
    ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}"


def _describe(value) -> str:
    if isinstance(value, dict):
        return "\n".join(f"- {k}: {_inline(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _inline(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return f"`{value}`" if isinstance(value, str) and "/" in value else str(value)
