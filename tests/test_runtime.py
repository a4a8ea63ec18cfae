"""Run-configuration choices (tpm_fast.runtime): ZeRO stage, precision, workers, threads."""

import pytest
import torch

from tpm_fast import runtime

CPU = torch.device("cpu")


def test_one_rank_bypasses_the_engine():
    stage, why = runtime.choose_zero_stage("auto", 1, 10**9, CPU)
    assert stage == "off" and "one rank" in why


@pytest.mark.parametrize(
    "params,memory,stage",
    [(10**6, 2**36, "0"), (2 * 10**8, 2**36, "0"), (2 * 10**9, 2**36, "2"), (10**10, 2**36, "3")],
)
def test_several_ranks_pick_a_stage_by_model_size(monkeypatch, params, memory, stage):
    monkeypatch.setattr(runtime, "device_memory", lambda device: memory)
    chosen, why = runtime.choose_zero_stage("auto", 8, params, CPU)
    assert chosen == stage and "8 ranks" in why
    for precision in ("bf16", "fp16"):  # both keep their fp32 master weights in a ZeRO optimizer
        assert runtime.choose_zero_stage("auto", 8, params, CPU, precision)[0] == ("1" if stage == "0" else stage)


def test_explicit_stage_is_kept():
    assert runtime.choose_zero_stage("3", 1, 10, CPU)[0] == "3"
    assert runtime.choose_zero_stage("off", 1, 10, CPU)[0] == "off"


@pytest.mark.parametrize("native,hidden,expected", [(True, 768, "bf16"), (True, 128, "fp32"), (False, 768, "fp32")])
def test_precision_auto(monkeypatch, native, hidden, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert runtime.choose_precision("auto", CPU, hidden)[0] == expected
    assert runtime.choose_precision("fp32", CPU, hidden)[0] == "fp32"


def test_bf16_asked_for_on_a_cpu_without_it_says_so(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    precision, why = runtime.choose_precision("bf16", CPU, 768)
    assert precision == "bf16" and "slower" in why


@pytest.mark.parametrize(
    "cores,ranks,mode,loader,workers",
    [(2, 1, "multi", "pil", 1), (2, 1, "text", "pil", 0), (2, 2, "multi", "pil", 0), (2, 1, "multi", "cache", 0),
     (16, 2, "multi", "cache", 0), (16, 2, "multi", "dali", 1)],
)  # fmt: skip
def test_image_threads_and_compute_threads_never_oversubscribe(monkeypatch, cores, ranks, mode, loader, workers):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TPM_FAST_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        chosen, _ = runtime.choose_image_threads(None, mode, CPU, loader)
        threads, _ = runtime.configure_threads(chosen, CPU)
        assert chosen == workers
        assert threads == torch.get_num_threads() >= 1
        assert ranks * (threads + chosen) == max(cores, ranks)  # every core busy, none shared
        ahead = runtime.feed_prefetch(chosen, threads, CPU)
        assert ahead == (0 if chosen == 0 and threads > 1 else 2)  # no thread beside all-core compute
    finally:
        torch.set_num_threads(before)


def test_the_feed_assembles_ahead_on_a_gpu():
    assert runtime.feed_prefetch(0, 1, torch.device("cuda", 0)) == runtime.feed_prefetch(4, 12, CPU) == 2


def test_user_thread_settings_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TPM_FAST_THREADS", raising=False)
    assert runtime.configure_threads(0, CPU) == (torch.get_num_threads(), "OMP_NUM_THREADS")
    assert runtime.choose_image_threads(3, "multi", CPU) == (3, "--image-threads")


def test_native_bf16_answers_without_error():
    assert runtime.native_bf16(CPU) in (True, False)


@pytest.mark.parametrize("share,expected", [(0.11, False), (0.25, True), (0.4, True)])
def test_bucketing_auto_only_where_padding_costs_a_quarter(share, expected):
    bucket, why = runtime.choose_bucketing("auto", share)
    assert bucket is expected and f"{share:.0%}" in why


@pytest.mark.parametrize("requested", ["on", "off"])
def test_bucketing_asked_for_is_kept(requested):
    assert runtime.choose_bucketing(requested, 0.11 if requested == "on" else 0.9) == (requested == "on", "asked for")


@pytest.mark.parametrize(
    "requested,mode,cuda,dali,cache,expected",
    [
        ("auto", "multi", True, True, None, "dali"),
        ("auto", "multi", True, False, "c", "cache"),
        ("auto", "multi", False, True, "c", "cache"),
        ("auto", "multi", False, True, None, "pil"),
        ("auto", "text", True, True, "c", "none"),
        ("pil", "first", True, True, "c", "pil"),
        ("cache", "multi", False, False, "c", "cache"),
        ("dali", "multi", False, True, None, "dali"),
    ],
)
def test_choose_image_loader(monkeypatch, requested, mode, cuda, dali, cache, expected):
    from tpm_fast.data import dali as dali_module

    monkeypatch.setattr(dali_module, "dali_unavailable", lambda: None if dali else "nvidia-dali is not installed")
    device = torch.device("cuda", 0) if cuda else CPU
    chosen, why = runtime.choose_image_loader(requested, mode, device, cache)
    assert chosen == expected and why
    if requested == "auto" and expected != "none":
        assert why.startswith("auto")


def test_choose_image_loader_refuses(monkeypatch):
    from tpm_fast.data import dali as dali_module

    monkeypatch.setattr(dali_module, "dali_unavailable", lambda: "nvidia-dali is not installed")
    with pytest.raises(ValueError, match="--image-loader dali: nvidia-dali is not installed"):
        runtime.choose_image_loader("dali", "multi", CPU, None)
    with pytest.raises(ValueError, match="needs --image-cache"):
        runtime.choose_image_loader("cache", "multi", CPU, None)


def test_fp16_needs_the_deepspeed_engine_and_a_gpu(monkeypatch):
    assert runtime.choose_zero_stage("auto", 1, 10, CPU, "fp16")[0] == "1"  # loss scaling: DeepSpeed's
    with pytest.raises(ValueError, match="needs DeepSpeed's loss scaling"):
        runtime.choose_zero_stage("off", 1, 10, CPU, "fp16")
    with pytest.raises(ValueError, match="on CPU use fp32 or bf16"):
        runtime.choose_precision("fp16", CPU, 768)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    assert runtime.choose_precision("fp16", gpu, 768) == ("fp16", "asked for")
    with pytest.raises(ValueError, match=r"\(Tesla V100\) has no bf16: use --fp16"):
        runtime.choose_precision("bf16", gpu, 768)
    precision, why = runtime.choose_precision("auto", gpu, 768)
    assert precision == "fp32" and "--fp16" in why
