"""The run record (tpm_fast.record): versions, device, data fingerprint and its comparison, resumes appended."""

import json
import random
from argparse import Namespace
from pathlib import Path

import torch

from tpm_fast import __version__
from tpm_fast.data.readers import Post
from tpm_fast.record import differences, fingerprint, read_record, run_record, versions, write_record


def corpus(tmp_path: Path) -> tuple[dict, dict]:
    rng = random.Random()
    files, posts = {}, {}
    for split in ("train", "val"):
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_bytes(rng.randbytes(rng.randint(10, 5000)))
        images = [tmp_path / f"{split}{i}.jpg" for i in range(rng.randint(2, 6))]
        for path in images[1:]:  # the first one is missing
            path.write_bytes(rng.randbytes(rng.randint(1, 300)))
        posts[split] = [Post(str(i), ["w"], ["O"], [p], f"x:{i}") for i, p in enumerate(images)]
    return files, posts


def test_fingerprint_counts_and_detects_changes(tmp_path):
    files, posts = corpus(tmp_path)
    fp = fingerprint(files, posts)
    for split, p in posts.items():
        present = [x for post in p for x in post.images if x.exists()]
        assert fp["images"][split] == {"named": len(p), "present": len(present),
                                        "bytes": sum(x.stat().st_size for x in present)}  # fmt: skip
        assert fp["files"][split]["bytes"] == files[split].stat().st_size
    assert differences(fp, fingerprint(files, posts)) == []
    with open(files["val"], "ab") as f:
        f.write(b"x")
    posts["train"][0].images[0].write_bytes(b"now present")
    changed = differences(fp, fingerprint(files, posts))
    assert len(changed) == 2 and "val file" in changed[0] and "train images" in changed[1]


def test_record_written_then_resumes_appended(tmp_path):
    files, posts = corpus(tmp_path)
    args = Namespace(seed=3, output_dir=str(tmp_path), local_rank=-1, ds_config=None)
    device = {"type": "cpu", "ranks": 1, "name": "x"}
    write_record(tmp_path, run_record(args, {"precision": ["fp32", "asked for"]}, device, fingerprint(files, posts)))
    first = read_record(tmp_path)
    assert first["arguments"] == {"output_dir": str(tmp_path), "seed": 3} and first["choices"]["precision"][0] == "fp32"
    assert first["versions"]["torch"] == torch.__version__ and first["versions"]["tpm-fast"] == __version__
    write_record(tmp_path, run_record(args, {}, device, {}))
    again = read_record(tmp_path)
    assert again["arguments"] == first["arguments"] and len(again["resumes"]) == 1
    assert json.loads((tmp_path / "run.json").read_text()) == again


def test_versions_name_python_and_torch():
    found = versions()
    assert found["python"].count(".") == 2 and found["torch"] == torch.__version__
