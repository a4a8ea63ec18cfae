"""The plain PyTorch text tagger a user would otherwise write: the baseline of the text-mode epoch-time target.

HF ``BertModel`` + linear emissions + pytorch-crf, ``torch.optim.AdamW`` (lr 5e-5, defaults otherwise), random
batches padded to their longest post, fp32, torch's default threads, no DeepSpeed. Same data and tokenization as
``train.py`` (``MNERDataset``), dev F1 scored the same way (seqeval on first pieces). Prints one JSON line per epoch.

    python bench/plain_loop.py --data-dir TWITTER2015_DIR --dataset twitter2015 --bert-model MINILM \\
        --epochs 1 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torchcrf import CRF
from transformers import AutoTokenizer, BertModel

from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.labels import LABELS
from tpm_fast.data.readers import load_split
from tpm_fast.engine import make_loader, set_epoch
from tpm_fast.metrics import entity_scores, word_tags


class BertCRF(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        self.emissions = nn.Linear(self.bert.config.hidden_size, len(LABELS))
        self.crf = CRF(len(LABELS), batch_first=True)

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
        return self.emissions(hidden.last_hidden_state)  # shape: (B, n, T)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="twitter2015")
    p.add_argument("--bert-model", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.bert_model, local_files_only=True)
    data = {s: MNERDataset(load_split(args.data_dir, args.dataset, s), tokenizer, 128, "text") for s in
            ("train", "val")}  # fmt: skip
    train = make_loader(data["train"], args.batch_size, shuffle=True, seed=args.seed)
    dev = make_loader(data["val"], 64, shuffle=False)
    model = BertCRF(args.bert_model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for epoch in range(1, args.epochs + 1):
        set_epoch(train, epoch)
        start = time.perf_counter()
        for posts in train:
            batch = posts.tensors
            loss = -model.crf(model(batch), batch["labels"], batch["attention_mask"], reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        model.eval()
        pred = []
        with torch.no_grad():
            for posts in dev:
                batch = posts.tensors
                tags = model.crf.decode(model(batch), batch["attention_mask"])
                padded = torch.tensor([t + [0] * (batch["input_ids"].shape[1] - len(t)) for t in tags])
                n_words = [len(data["val"].posts[i].words) for i in batch["index"].tolist()]
                pred += word_tags(padded, batch["first_piece"], n_words, LABELS)
        model.train()
        f1 = entity_scores([post.labels for post in data["val"].posts], pred)["f1"]
        posts = len(data["train"])
        print(json.dumps({"epoch": epoch, "train_seconds": seconds, "posts_per_s": posts / seconds, "dev_f1": f1}))


if __name__ == "__main__":
    main()
