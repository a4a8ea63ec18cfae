"""The shareable export: round trip, image settings as HF reads them, version check, legacy files, atomic replace."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, BertTokenizer

from tests.test_model import MASK, make_batch, make_config
from tpm_fast.data.images import ImageSpec
from tpm_fast.engine import export_model, load_exported
from tpm_fast.export import FORMAT_VERSION, load_pretrained, read_info, save_pretrained, update_card
from tpm_fast.model import TPMMI, save_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["obama", "visits", "new", "york", "##er", "coach", "paris", "club"]


@pytest.fixture
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def random_spec(seed: int) -> ImageSpec:
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.rand(3, generator=g), torch.rand(3, generator=g) + 0.1
    return ImageSpec(size=int(torch.randint(8, 300, (1,), generator=g)), mean=mean.tolist(), std=std.tolist(),
                     rescale=float(torch.rand(1, generator=g)))  # fmt: skip


def random_model(seed: int, **kw) -> TPMMI:
    torch.manual_seed(seed)
    model = TPMMI(make_config(**kw)).eval()
    with torch.no_grad():  # the CRF's uniform(-0.1, 0.1) start would hide a mix-up of its parameters
        for p in model.crf.parameters():
            p.normal_()
    return model


def outputs(model: TPMMI, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = make_batch(MASK, seed=seed)
    with torch.no_grad():
        return model.emission_scores(batch), model.decode(batch)[0]


def assert_same_outputs(a: TPMMI, b: TPMMI, seed: int) -> None:
    (em_a, tags_a), (em_b, tags_b) = outputs(a, seed), outputs(b, seed)
    torch.testing.assert_close(em_b, em_a, rtol=0, atol=0)
    assert torch.equal(tags_b, tags_a)


@pytest.mark.parametrize("image_mode", ["text", "multi"])
def test_round_trip_gives_identical_outputs(tmp_path, tokenizer, image_mode):
    seed = int(torch.randint(0, 2**31, (1,)))  # fresh weights and inputs each run
    model, spec = random_model(seed, image_mode=image_mode), random_spec(seed)
    card = {"data": {"dataset": "synthetic"}, "recipe": {"lr": 3e-3}, "seeds": [seed],
            "scores": {"dev": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3}}}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps({"seed": seed}))
    model.save_pretrained(tmp_path / "export", tokenizer=tokenizer, image_spec=spec, max_seq_length=37, card=card,
                          training={"step": 12, "epoch": 2}, files={"run.json": tmp_path / "run.json"})  # fmt: skip
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "tokenizer.json"} <= names
    assert not list(tmp_path.glob(".export*"))  # no temporary folder left beside it
    assert (tmp_path / "export" / "run.json").read_text() == (tmp_path / "run.json").read_text()
    with pytest.raises(ValueError, match="cannot add a file named 'config.json'"):
        model.save_pretrained(tmp_path / "export", tokenizer=tokenizer, image_spec=spec, max_seq_length=37,
                              files={"config.json": tmp_path / "run.json"})  # fmt: skip

    loaded = load_pretrained(tmp_path / "export")
    assert loaded.model.config == model.config and not loaded.model.training
    assert (loaded.image_spec, loaded.max_seq_length) == (spec, 37)
    assert loaded.info["training"] == {"step": 12, "epoch": 2} and loaded.info["card"] == card
    encode = dict(is_split_into_words=True)
    assert loaded.tokenizer(WORDS, **encode)["input_ids"] == tokenizer(WORDS, **encode)["input_ids"]
    assert_same_outputs(model, loaded.model, seed + 1)
    assert_same_outputs(model, TPMMI.from_pretrained(tmp_path / "export"), seed + 2)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "| dev | 50.00 | 25.00 | 33.33 |" in readme and "| test | pending |" in readme and str(seed) in readme


def test_weights_are_fp32_safetensors_from_the_given_state_dict(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model, other = random_model(1), random_model(2)
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in other.state_dict().items()}
    flat = torch.cat([v.flatten() for v in half.values() if v.is_floating_point()]).float()
    offsets = itertools.accumulate((v.numel() for v in half.values() if v.is_floating_point()), initial=0)
    views = {k: flat[o : o + v.numel()].view_as(v) for (k, v), o in zip(half.items(), offsets)}  # one shared buffer
    for given in (half, views):  # bf16 weights; fp32 views into one buffer (as zero_to_fp32 gathers them)
        save_pretrained(model, tmp_path / "e", tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9,
                        state_dict=given)  # fmt: skip
        saved = load_file(tmp_path / "e" / "model.safetensors")
        assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
        assert saved.keys() == model.state_dict().keys()
        for k, v in half.items():  # the given weights, not the module's
            torch.testing.assert_close(saved[k], v.float(), rtol=0, atol=0)


def test_image_settings_read_by_hf_and_back(tmp_path, tokenizer):
    spec = random_spec(int(torch.randint(0, 2**31, (1,))))
    save_pretrained(random_model(0), tmp_path / "e", tokenizer=tokenizer, image_spec=spec, max_seq_length=9)
    proc = AutoImageProcessor.from_pretrained(tmp_path / "e", local_files_only=True)
    assert dict(proc.size) == {"height": spec.size, "width": spec.size} and int(proc.resample) == 2
    assert proc.do_rescale and proc.do_normalize and proc.rescale_factor == spec.rescale
    assert tuple(proc.image_mean) == spec.mean and tuple(proc.image_std) == spec.std
    assert ImageSpec.from_pretrained(tmp_path / "e") == spec  # the reader train.py uses for --vit-model


def test_newer_format_and_foreign_folders_refused(tmp_path, tokenizer):
    save_pretrained(random_model(0), tmp_path / "e", tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9)
    config = tmp_path / "e" / "config.json"
    info = json.loads(config.read_text())
    assert info["format"] == "tpm-fast" and info["format_version"] == FORMAT_VERSION
    config.write_text(json.dumps(dict(info, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(ValueError, match=rf"{config}: export format version {FORMAT_VERSION + 1} is newer .*upgrade"):
        load_pretrained(tmp_path / "e")
    config.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))  # an HF model folder
    with pytest.raises(ValueError, match="not a tpm-fast export"):
        load_pretrained(tmp_path / "e")
    config.write_text("{not json")
    with pytest.raises(ValueError, match=f"{config}: not valid JSON"):
        read_info(tmp_path / "e")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*python -m tpm_fast.export convert"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        load_pretrained(tmp_path / "absent")


def legacy_file(model: TPMMI, tokenizer, folder: Path, spec: ImageSpec) -> Path:
    """A best_model.pt as tpm-fast 0.2 wrote it: save_model's dict plus image_spec, max_seq_length, epoch, step, and
    tokenizer/ beside it."""
    import dataclasses

    folder.mkdir()
    extra = {"max_seq_length": 21, "image_spec": dataclasses.asdict(spec), "epoch": 3, "step": 36}
    save_model(model, folder / "best_model.pt", extra)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder / "best_model.pt"


def test_legacy_file_loads_and_converts(tmp_path, tokenizer, caplog):
    seed = int(torch.randint(0, 2**31, (1,)))
    model, spec = random_model(seed), random_spec(seed)
    legacy = legacy_file(model, tokenizer, tmp_path / "run", spec)
    old = load_pretrained(legacy)  # the same entry point, with a warning saying how to convert
    assert "python -m tpm_fast.export convert" in caplog.text
    assert (old.image_spec, old.max_seq_length, old.info["training"]) == (spec, 21, {"epoch": 3, "step": 36})
    assert_same_outputs(model, old.model, seed)
    cmd = [sys.executable, "-m", "tpm_fast.export", "convert", str(legacy), str(tmp_path / "converted")]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    new = load_pretrained(tmp_path / "converted")
    assert (new.image_spec, new.max_seq_length, new.info["training"]) == (spec, 21, {"epoch": 3, "step": 36})
    assert_same_outputs(model, new.model, seed + 1)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: neither an export folder nor a legacy best_model.pt"):
        load_pretrained(tmp_path / "junk.pt")
    save_model(model, tmp_path / "alone.pt")
    with pytest.raises(FileNotFoundError, match="needs its .*tokenizer folder beside it"):
        load_pretrained(tmp_path / "alone.pt")


def test_engine_export_and_load(tmp_path, tokenizer):
    """engine.export_model / load_exported: the folder train.py exports, read back as (model, tokenizer, spec, len)."""
    model, spec = random_model(5), random_spec(5)
    export_model(model, model.state_dict(), tokenizer, spec, 33, tmp_path / "best_model", card={"seeds": [5]},
                 epoch=2, step=8)  # fmt: skip
    loaded, tok, loaded_spec, max_len = load_exported(tmp_path / "best_model")
    assert (loaded_spec, max_len, type(tok)) == (spec, 33, type(tokenizer))
    assert read_info(tmp_path / "best_model")["training"] == {"epoch": 2, "step": 8}
    assert_same_outputs(model, loaded, 6)


def test_replace_is_atomic(tmp_path, tokenizer, monkeypatch):
    first, second = random_model(1), random_model(2)
    target = tmp_path / "best_model"
    save_pretrained(first, target, tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(second, target, tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9)
    assert_same_outputs(first, load_pretrained(target).model, 3)  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]  # nothing half-written left
    monkeypatch.undo()
    save_pretrained(second, target, tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9)
    assert_same_outputs(second, load_pretrained(target).model, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def test_update_card_fills_test_scores(tmp_path, tokenizer):
    card = {"seeds": [7], "scores": {"dev": {"precision": 0.9, "recall": 0.8, "f1": 0.85}}}
    save_pretrained(random_model(0), tmp_path / "e", tokenizer=tokenizer, image_spec=ImageSpec(), max_seq_length=9,
                    card=card)  # fmt: skip
    merged = update_card(tmp_path / "e", {"scores": {"test": {"precision": 0.7, "recall": 0.6, "f1": 0.65}}})
    assert merged["scores"]["dev"]["f1"] == 0.85 and merged["seeds"] == [7]
    assert read_info(tmp_path / "e")["card"] == merged
    readme = (tmp_path / "e" / "README.md").read_text()
    assert "| dev | 90.00 | 80.00 | 85.00 |" in readme and "| test | 70.00 | 60.00 | 65.00 |" in readme


FRESH_PROCESS = """
import json, sys, torch
from tpm_fast import TPMMI
from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, PILImages
from tpm_fast.data.readers import load_split
from tpm_fast.engine import evaluate, make_loader
from tpm_fast.export import load_pretrained

export, data, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = TPMMI.from_pretrained(export)
exported = load_pretrained(export)  # the tokenizer, image settings and length it was trained with
dataset = MNERDataset(load_split(data, "synthetic", "test"), exported.tokenizer, exported.max_seq_length,
                      model.config.image_mode)
feed = ImageFeed(make_loader(dataset, batch_size, shuffle=False), PILImages(exported.image_spec), torch.device("cpu"))
print(json.dumps(evaluate(model, feed, progress=False)))
"""


def test_run_export_scores_the_runs_test_f1_in_a_fresh_process(tmp_path):
    """train.py exports OUTPUT/best_model; a new Python process loads it with from_pretrained (nothing else from the
    run) and scores the test set: the F1 of the run's results.json, exactly."""
    from tests.test_train import SMALL, run
    from tpm_fast.data.synthetic import ensure_synthetic_corpus

    corpus = ensure_synthetic_corpus(tmp_path / "cache", seed=3, n_train=64, n_val=16, n_test=16)
    # seed 1: this short run finds entities (an F1 of 0 would be reproduced by any model); many seeds' runs find none
    run("train.py", "--data-dir", str(corpus), "--output-dir", str(tmp_path / "run"), *SMALL, "--seed", "1")
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "run" / "best_model"), str(corpus),
                           "16"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ,
                           "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.splitlines()[-1])
    assert 0 < scores["f1"] and scores["f1"] == result["test_f1"]
    assert (scores["precision"], scores["recall"]) == (result["test_precision"], result["test_recall"])
    assert read_info(tmp_path / "run" / "best_model")["card"]["scores"]["test"]["f1"] == result["test_f1"]
    record = (tmp_path / "run" / "run.json").read_text()
    assert (tmp_path / "run" / "best_model" / "run.json").read_text() == record  # the run record travels along
