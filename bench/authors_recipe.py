"""The authors' TPM-MI training recipe, re-implemented with public libraries: the speed baseline.

What the authors' code does per step (as the MNER-MI paper's released code is described in the project notes):
HF ``BertModel`` with the image prefix passed as a key/value cache (here ``DynamicCache``, transformers 5's API),
``ViTModel`` on all 4 image slots (an all-zero image in empty slots), the pooler output as image feature, an
``nn.TransformerEncoderLayer(768, 8)`` without ``batch_first`` (so it attends across the posts of a batch),
pytorch-crf with a Viterbi decode every step, every post padded to 64 pieces, fp32, ``torch.optim.AdamW`` with its
defaults and no gradient clipping. Attention is transformers' eager path (the authors' transformers 4.x had no SDPA
for BERT or ViT). With ``dynamic=True`` the same module pads each batch to its longest post and runs ViT on the
present images only (empty slots get a zero feature): the first step of our speed ladder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchcrf import CRF
from transformers import BertConfig, BertModel, DynamicCache, ViTConfig, ViTModel

SLOTS = 4


class AuthorsTPMMI(nn.Module):
    """TPM-MI as the authors' code builds it (text-only when ``vit_config`` is None: BERT-CRF).

    Args:
        bert_config, vit_config: HF configs (random weights: only the sizes matter for speed).
        num_tags: CRF tags (10 in the authors' label set).
        prefix_hidden: width of the prefix MLP (1024).
        dynamic: present images only through ViT (zero feature for empty slots); else all 4 slots.
    """

    def __init__(
        self,
        bert_config: BertConfig,
        vit_config: ViTConfig | None,
        num_tags: int = 10,
        prefix_hidden: int = 1024,
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        bert_config._attn_implementation = "eager"
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.vit = None
        self.dynamic = dynamic
        if vit_config is not None:
            vit_config._attn_implementation = "eager"
            self.vit = ViTModel(vit_config, add_pooling_layer=True)
            d_v, bc = vit_config.hidden_size, bert_config
            self.temporal = nn.Parameter(torch.randn(SLOTS, d_v))
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_v, 8, 2048), 1)
            out = bc.num_hidden_layers * 2 * bc.hidden_size
            self.project = nn.Sequential(nn.Linear(d_v, prefix_hidden), nn.Tanh(), nn.Linear(prefix_hidden, out))
        self.emissions = nn.Linear(bert_config.hidden_size, num_tags)
        self.crf = CRF(num_tags, batch_first=True)

    def prefix(self, batch: dict) -> DynamicCache:
        """The per-layer prefix as a ``DynamicCache`` of L pairs (B, H, 4, d_h)."""
        bc = self.bert.config
        b = batch["input_ids"].shape[0]
        if self.dynamic:  # present images only, zero feature for empty slots
            feats = self.vit(pixel_values=batch["pixel_values"]).pooler_output  # shape: (N, d_v)
            where = (batch["image_post"], batch["image_slot"])
            slots = feats.new_zeros(b, SLOTS, feats.shape[1]).index_put(where, feats)  # shape: (B, 4, d_v)
        else:  # all 4 slots, zero images included
            pixels = batch["slot_pixels"]  # shape: (B, 4, 3, S, S)
            slots = self.vit(pixel_values=pixels.flatten(0, 1)).pooler_output.view(b, SLOTS, -1)
        u = self.encoder(slots + self.temporal)  # (B, 4, d_v) read as (seq=B, batch=4): the authors' layout
        heads, d_h = bc.num_attention_heads, bc.hidden_size // bc.num_attention_heads
        p = self.project(u).view(b, SLOTS, bc.num_hidden_layers, 2, heads, d_h).permute(2, 3, 0, 4, 1, 5)
        return DynamicCache([(p[i, 0], p[i, 1]) for i in range(bc.num_hidden_layers)])

    def forward(self, batch: dict) -> tuple[Tensor, list[list[int]]]:
        """Mean negative log-likelihood and the Viterbi paths (decoded every step, as the authors do)."""
        mask = batch["attention_mask"]
        if self.vit is None:
            hidden = self.bert(input_ids=batch["input_ids"], attention_mask=mask.long()).last_hidden_state
        else:
            ones = mask.new_ones(mask.shape[0], SLOTS)
            full = torch.cat([ones, mask], 1).long()  # shape: (B, 4 + n)
            hidden = self.bert(input_ids=batch["input_ids"], attention_mask=full, cache=self.prefix(batch))
            hidden = hidden.last_hidden_state
        emissions = self.emissions(hidden)  # shape: (B, n, T)
        loss = -self.crf(emissions, batch["labels"], mask, reduction="mean")
        return loss, self.crf.decode(emissions, mask)


def build(bert_config: BertConfig, vit_config: ViTConfig | None, dynamic: bool) -> tuple[nn.Module, object]:
    """The authors' module and optimizer (``torch.optim.AdamW`` defaults, lr 5e-5)."""
    model = AuthorsTPMMI(bert_config, vit_config, dynamic=dynamic).train()
    return model, torch.optim.AdamW(model.parameters(), lr=5e-5)


def step(model: nn.Module, optimizer, batch: dict) -> Tensor:
    """One training step of the recipe: forward (with decode), backward, AdamW, zero the gradients."""
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss
