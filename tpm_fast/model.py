"""TPM-MI: prompted BERT + multi-image prefixes + CRF (paper section 4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from tpm_fast.data.dataset import IMAGE_MODES
from tpm_fast.data.images import MAX_IMAGES
from tpm_fast.data.labels import LABELS
from tpm_fast.layers.crf import CRF
from tpm_fast.layers.dropout import use_fast_dropout
from tpm_fast.layers.image_prefix import IMAGE_FEATURES, IMAGE_PADDINGS, ImagePrefix
from tpm_fast.layers.prompted_bert import prompted_bert
from tpm_fast.ops.backend import check_backend

# Small configs for the embedded default corpus and the tests (trained from scratch in minutes on a CPU).
TINY_BERT = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, max_position_embeddings=160
)
TINY_VIT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=224,
    patch_size=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@dataclass
class TPMConfig:
    """Everything needed to rebuild a TPM-MI model (saved in every exported checkpoint).

    ``bert`` / ``vit`` are HF config dicts; :func:`build_model` fills them from ``bert_model`` / ``vit_model`` (local
    folders or names in the local HF cache; nothing is downloaded) or from the tiny configs above. ``dropout`` is the
    Transformer-across-images' dropout; ``prefix_dropout`` and ``emission_dropout`` act on the prefix vectors and on
    BERT's output before the emission layer; ``temporal_init_std`` initializes the temporal embedding.
    """

    labels: tuple[str, ...] = LABELS
    image_mode: str = "multi"
    image_padding: str = "zero_feature"
    image_feature: str = "cls"
    prefix_hidden: int = 1024
    temporal_layers: int = 1
    temporal_heads: int = 8
    temporal_ffn: int = 2048
    dropout: float = 0.1
    prefix_dropout: float = 0.1
    emission_dropout: float = 0.1
    temporal_init_std: float = 0.02
    shift_positions: bool = True
    bert: dict = field(default_factory=dict)
    vit: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        for name, value, allowed in (
            ("image_mode", self.image_mode, IMAGE_MODES),
            ("image_padding", self.image_padding, IMAGE_PADDINGS),
            ("image_feature", self.image_feature, IMAGE_FEATURES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class TPMMI(nn.Module):
    """The TPM-MI tagger. ``forward`` returns the mean negative CRF log-likelihood; ``decode`` the Viterbi tags.

    Batches are the ``tensors`` of :class:`tpm_fast.data.feed.Batch`: ``input_ids`` (B, n) long, ``attention_mask``
    (B, n) bool, ``labels`` (B, n) long, ``pixel_values`` (N, 3, S, S) float (present images only),
    ``image_post`` / ``image_slot`` (N,) long, ``image_mask`` (B, m) bool, and optionally ``token_index`` (T,) long
    (:func:`tpm_fast.layers.prompted_bert.pack_index` of the mask: BERT then skips the padding on CUDA too; on CPU
    it always does).

    ``backend`` picks the attention, CRF and dropout kernels: ``"auto"`` (Triton on CUDA, the native C++ kernels on
    CPU, else the PyTorch reference; dropout: native on CPU, else ``F.dropout``), ``"triton"``, ``"native"`` or
    ``"reference"``; a run-time choice, not part of the saved config.
    """

    def __init__(
        self, config: TPMConfig, bert: BertModel | None = None, vit: ViTModel | None = None, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.bert = bert if bert is not None else BertModel(BertConfig(**config.bert), add_pooling_layer=False)
        self.images = None
        if config.image_mode != "text":
            if vit is None:
                vit = ViTModel(ViTConfig(**config.vit), add_pooling_layer=config.image_feature == "pooler")
            bc = self.bert.config
            self.images = ImagePrefix(
                vit,
                num_layers=bc.num_hidden_layers,
                num_heads=bc.num_attention_heads,
                head_dim=bc.hidden_size // bc.num_attention_heads,
                slots=MAX_IMAGES,
                prefix_hidden=config.prefix_hidden,
                temporal_layers=config.temporal_layers,
                temporal_heads=config.temporal_heads,
                temporal_ffn=config.temporal_ffn,
                image_padding=config.image_padding,
                image_feature=config.image_feature,
                dropout=config.prefix_dropout,
                temporal_dropout=config.dropout,
                temporal_init_std=config.temporal_init_std,
            )
        self.dropout = nn.Dropout(config.emission_dropout)
        self.emissions = nn.Linear(self.bert.config.hidden_size, len(config.labels))
        self.crf = CRF(len(config.labels), batch_first=True)
        self.backend = backend  # the CRF's, and every nn.Dropout's (BERT's, ViT's, the prefix's, the emissions')

    @property
    def backend(self) -> str:
        return self.crf.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.crf.backend = check_backend(value)
        use_fast_dropout(self, value)

    @property
    def max_pieces(self) -> int:
        """Longest post in word pieces that BERT's position embeddings fit (positions start at m with a prefix)."""
        shift = MAX_IMAGES if self.images is not None and self.config.shift_positions else 0
        return self.bert.config.max_position_embeddings - shift

    def emission_scores(self, batch: dict) -> Tensor:
        """(B, n, num_tags) emission scores of a collated batch."""
        prefix = None
        if self.images is not None:
            prefix = self.images(batch["pixel_values"], batch["image_post"], batch["image_slot"], batch["image_mask"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        shift, index = self.config.shift_positions, batch.get("token_index")  # index: skip padding on CUDA too
        hidden = prompted_bert(self.bert, ids, mask, prefix, shift, self.backend, token_index=index)  # (B, n, d_t)
        return self.emissions(self.dropout(hidden))  # shape: (B, n, num_tags)

    def forward(self, batch: dict, decode: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mean over the batch of the negative CRF log-likelihood (a scalar), as in the authors' code.

        With ``decode=True`` also the Viterbi tags (B, n) long of the same emissions (the authors decode every
        training step for a train-set F1; here only when asked).
        """
        emissions = self.emission_scores(batch).float()  # shape: (B, n, T)
        mask = batch["attention_mask"]  # collate's masks are left-aligned with [CLS] on: no host-side check
        loss = -self.crf(emissions, batch["labels"], mask, reduction="mean", validate=False)
        if not decode:
            return loss
        return loss, self.crf.decode(emissions.detach(), mask, as_tensor=True, validate=False)[0]

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        tokenizer,
        image_spec,
        max_seq_length: int,
        state_dict: dict[str, Tensor] | None = None,
        card: dict | None = None,
        training: dict | None = None,
        files: dict[str, Path] | None = None,
    ) -> Path:
        """Write the shareable export folder: :func:`tpm_fast.export.save_pretrained` (which documents the arguments).

        Returns:
            ``directory`` as a Path.
        """
        from tpm_fast.export import save_pretrained  # the export module builds on this one

        return save_pretrained(self, directory, tokenizer=tokenizer, image_spec=image_spec,
                               max_seq_length=max_seq_length, state_dict=state_dict, card=card,
                               training=training, files=files)  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> TPMMI:
        """The model (eval mode, on ``device``) of an export folder or a legacy ``best_model.pt``, loaded offline;
        :func:`tpm_fast.export.load_pretrained` also returns its tokenizer, image settings and max length."""
        from tpm_fast.export import load_pretrained

        return load_pretrained(path, device).model

    @torch.no_grad()
    def decode(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Viterbi tags: (B, n) long padded with 0, and (B,) lengths.

        ``crf.decode`` is not a module forward, so ZeRO-3 hooks do not gather the CRF parameters for it; they are
        below ZeRO-3's ``stage3_param_persistence_threshold`` (T^2 + 2T << 1e5 values) and are never partitioned.
        """
        emissions = self.emission_scores(batch)
        return self.crf.decode(emissions.float(), batch["attention_mask"], as_tensor=True, validate=False)


def _pretrained(cls, name: str, **kwargs):
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load {cls.__name__} {name!r} offline: give a local folder with config.json and weights "
            f"(nothing is downloaded at run time). {err}"
        ) from err


def build_model(config: TPMConfig, vocab_size: int, bert_model: str | None = None, vit_model: str | None = None):
    """Build TPM-MI with pretrained BERT / ViT weights from local paths, or the tiny configs when None.

    Args:
        config: model options; its ``bert`` / ``vit`` dicts are filled in here (for the exported checkpoint).
        vocab_size: tokenizer size, used by the tiny BERT.
        bert_model, vit_model: local model folders (or names already in the local HF cache).

    Returns:
        A :class:`TPMMI`.
    """
    bert = vit = None
    if bert_model:
        bert = _pretrained(BertModel, bert_model, add_pooling_layer=False)
        config.bert = bert.config.to_dict()
    elif not config.bert:
        config.bert = dict(TINY_BERT, vocab_size=vocab_size)
    if config.image_mode != "text":
        if vit_model:
            vit = _pretrained(ViTModel, vit_model, add_pooling_layer=config.image_feature == "pooler")
            config.vit = vit.config.to_dict()
        elif not config.vit:
            config.vit = dict(TINY_VIT)
    return TPMMI(config, bert, vit)


def save_model(model: TPMMI, path: str | Path, extra: dict | None = None, state_dict: dict | None = None) -> None:
    """Write ``{"config", "state_dict", **extra}`` to ``path`` atomically (temporary name, then rename).

    Args:
        model: the model (its config is saved).
        path: the file to write.
        extra: more entries (plain Python values) to store beside.
        state_dict: the weights to save instead of ``model.state_dict()`` (e.g. the fp32 master weights of a
            DeepSpeed checkpoint when the module itself is bf16 or ZeRO-3 partitioned).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    weights = {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()}
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": weights, **(extra or {})}, tmp)
    tmp.replace(path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TPMMI, dict]:
    """Rebuild a model saved by :func:`save_model` (no pretrained folders needed).

    Returns:
        (model in eval mode, the whole saved dict).
    """
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = TPMMI(TPMConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(map_location).eval(), blob
