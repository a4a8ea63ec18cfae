"""Images of a post -> per-layer prefix keys/values (TPM-MI, paper section 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import ViTModel

IMAGE_PADDINGS = ("zero_feature", "zero_pixel")
IMAGE_FEATURES = ("cls", "pooler")


class ImagePrefix(nn.Module):
    """ViT per present image, temporal embedding, Transformer across a post's images, MLP to prefixes.

    Args:
        vit: an HF ``ViTModel`` (with a pooler when ``image_feature="pooler"``).
        num_layers, num_heads, head_dim: the prompted BERT's L, H and d_h.
        slots: m, the image slots per post (4 in MNER-MI).
        prefix_hidden: width of the prefix MLP (1024 in the authors' code).
        temporal_layers, temporal_heads, temporal_ffn: the Transformer encoder across images.
        image_padding: ``"zero_feature"`` (paper: empty slots hold a zero representation) or ``"zero_pixel"``
            (authors' code: empty slots hold ViT's output for an all-zero image, computed once per batch).
        image_feature: ``"cls"`` (paper: last-layer [CLS] activation) or ``"pooler"`` (authors' code).
        dropout: dropout on the prefix vectors.
        temporal_dropout: dropout inside the Transformer across images.
        temporal_init_std: standard deviation of the temporal embedding's normal initialization (0.02, as BERT's
            embeddings; the authors' ``nn.Parameter(torch.randn(...))`` is 1.0).
    """

    def __init__(
        self,
        vit: ViTModel,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        slots: int = 4,
        prefix_hidden: int = 1024,
        temporal_layers: int = 1,
        temporal_heads: int = 8,
        temporal_ffn: int = 2048,
        image_padding: str = "zero_feature",
        image_feature: str = "cls",
        dropout: float = 0.1,
        temporal_dropout: float = 0.1,
        temporal_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if image_padding not in IMAGE_PADDINGS:
            raise ValueError(f"image_padding must be one of {IMAGE_PADDINGS}, got {image_padding!r}")
        if image_feature not in IMAGE_FEATURES:
            raise ValueError(f"image_feature must be one of {IMAGE_FEATURES}, got {image_feature!r}")
        if image_feature == "pooler" and vit.pooler is None:
            raise ValueError("image_feature='pooler' needs a ViTModel built with add_pooling_layer=True")
        self.vit = vit
        self.slots, self.num_layers, self.num_heads, self.head_dim = slots, num_layers, num_heads, head_dim
        self.image_padding, self.image_feature = image_padding, image_feature
        d_v = vit.config.hidden_size
        self.temporal = nn.Parameter(torch.zeros(slots, d_v))  # T: learnable temporal position embedding
        nn.init.normal_(self.temporal, std=temporal_init_std)
        layer = nn.TransformerEncoderLayer(d_v, temporal_heads, temporal_ffn, temporal_dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, temporal_layers, enable_nested_tensor=False)
        d_t = num_heads * head_dim
        self.project = nn.Sequential(
            nn.Linear(d_v, prefix_hidden), nn.Tanh(), nn.Linear(prefix_hidden, num_layers * 2 * d_t)
        )
        self.dropout = nn.Dropout(dropout)

    def features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) float images -> (N, d_v) ViT features ([CLS] activation or pooler output)."""
        out = self.vit(pixel_values=pixel_values)
        return out.pooler_output if self.image_feature == "pooler" else out.last_hidden_state[:, 0]

    def forward(self, pixel_values: Tensor, image_post: Tensor, image_slot: Tensor, image_mask: Tensor) -> list:
        """Build the prefix of every BERT layer.

        Args:
            pixel_values: (N, 3, S, S) float, only the present images of the batch (N may be 0).
            image_post: (N,) long, post index of each image.
            image_slot: (N,) long, slot (0..m-1) of each image.
            image_mask: (B, m) bool presence map; False slots are filled per ``image_padding``.

        Returns:
            L pairs (k_p, v_p), each (B, H, m, d_h).
        """
        batch, n = image_mask.shape[0], pixel_values.shape[0]
        dtype = self.temporal.dtype
        # ViT runs exactly once per forward on every rank (ZeRO reduces the same gradients and gathers the same
        # parameters everywhere), also when a batch has no image: a zero image joins the present ones when it is
        # the padding (zero_pixel, once per batch, not once per empty slot) or when there is nothing else to run.
        if self.image_padding == "zero_pixel" or n == 0:
            size = self.vit.config.image_size
            zero = pixel_values.new_zeros(1, 3, size, size)
            pixel_values = torch.cat([pixel_values, zero])  # shape: (N + 1, 3, S, S)
        feats = self.features(pixel_values).to(dtype)  # shape: (N (+ 1), d_v)
        slots = feats.new_zeros(batch, self.slots, feats.shape[1])  # shape: (B, m, d_v)
        slots = slots.index_put((image_post, image_slot), feats[:n])
        if self.image_padding == "zero_pixel":
            slots = torch.where(image_mask[..., None], slots, feats[n])
        elif n == 0:
            slots = slots + 0.0 * feats.sum()  # keeps ViT in the graph: zero gradients, same on every rank
        u = self.encoder(slots + self.temporal)  # shape: (B, m, d_v), attention across the images of each post
        p = self.dropout(self.project(u))  # shape: (B, m, L * 2 * d_t)
        p = p.view(batch, self.slots, 2 * self.num_layers, self.num_heads, self.head_dim)
        # one copy for all layers, so each layer's k_p / v_p is a dense (B, H, m, d_h) block the attention reads in
        # place; unbind's backward is one stack (per-layer slicing would scatter a full-size gradient per slice)
        kv = p.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # shape: 2L x (B, H, m, d_h)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]
