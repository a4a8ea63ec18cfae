"""tpm_fast.ops.backend: backend resolution, the one dtype / head-dim / tag rules, and the first-use self-check (run
here on CPU under the Triton interpreter by letting ``"auto"`` pick Triton on CPU tensors)."""

from __future__ import annotations

import warnings

import pytest
import torch

import tpm_fast.kernels.prefix_attention as attention_kernels
from tpm_fast.ops import backend, native
from tpm_fast.ops.prefix_attention import prefix_attention
from tpm_fast.reference.prefix_attention import prefix_attention as reference

CPU = torch.device("cpu")


def test_resolve_rules():
    assert backend.resolve("reference", "prefix_attention", CPU, torch.float32, None) == "reference"
    native = backend.native_unavailable_reason() is None
    auto_cpu = backend.resolve("auto", "prefix_attention", CPU, torch.float32, None)
    assert auto_cpu == ("native" if native else "reference")
    assert backend.resolve("triton", "prefix_attention", CPU, torch.float32, None) == "triton"  # interpreter
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve("cuda", "prefix_attention", CPU, torch.float32, None)
    reason = backend.attention_unsupported(torch.float64, 64)
    assert "fp32/fp16/bf16" in reason
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        backend.resolve("triton", "prefix_attention", CPU, torch.float64, reason)
    assert "power of 2" in backend.attention_unsupported(torch.float32, 48)
    assert backend.attention_unsupported(torch.bfloat16, 128) is None
    assert f"at most {backend.MAX_TAGS}" in backend.crf_unsupported(torch.float32, backend.MAX_TAGS + 1)
    assert backend.crf_unsupported(torch.bfloat16, 10) is None


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(2, 2, 9, 16, generator=g) for _ in range(3)]
    return qkv + [torch.randn(2, 2, 3, 16, generator=g) for _ in range(2)]


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``"auto"`` may pick Triton on CPU tensors (the interpreter), with a fresh self-check cache."""
    monkeypatch.setattr(backend, "AUTO_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(backend, "_PASSED", {})
    monkeypatch.delenv("TPM_FAST_SELF_CHECK", raising=False)


def test_self_check_passes_and_auto_then_runs_triton(auto_on_cpu, monkeypatch):
    launches = []
    launch = attention_kernels.launch_fwd_into
    monkeypatch.setattr(attention_kernels, "launch_fwd_into", lambda *a: launches.append(1) or launch(*a))
    with warnings.catch_warnings(), torch.no_grad():  # the first call under no_grad: the check still runs backward
        warnings.simplefilter("error")
        out = prefix_attention(*_inputs())
    assert backend._PASSED == {("prefix_attention", "cpu", torch.float32): True}
    checked = len(launches)
    assert checked >= 2  # the self-check's own Triton runs, then this call's
    torch.testing.assert_close(out, reference(*_inputs()), rtol=1e-5, atol=1e-5)
    prefix_attention(*_inputs())
    assert len(launches) == checked + 1  # checked once per device, not per call


def test_wrong_kernel_warns_once_and_falls_back_to_the_reference(auto_on_cpu, monkeypatch):
    launch = attention_kernels.launch_fwd_into

    def wrong(plan, q, k, v, k_p, v_p, out, lse):  # an injected miscompiled kernel: output off by 1 %
        launch(plan, q, k, v, k_p, v_p, out, lse)
        out.mul_(1.01)

    monkeypatch.setattr(attention_kernels, "launch_fwd_into", wrong)
    with pytest.warns(
        RuntimeWarning, match=r"prefix_attention kernel failed its first-use self-check on cpu \(float32\)"
    ):
        out = prefix_attention(*_inputs())
    assert torch.equal(out, reference(*_inputs()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are silent, still the reference
        assert torch.equal(prefix_attention(*_inputs(1)), reference(*_inputs(1)))
    assert backend._PASSED == {("prefix_attention", "cpu", torch.float32): False}


def test_self_check_can_be_turned_off(auto_on_cpu, monkeypatch):
    monkeypatch.setenv("TPM_FAST_SELF_CHECK", "0")
    monkeypatch.setattr(attention_kernels, "launch_fwd_into", lambda *a: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(AssertionError):  # no check: "auto" goes straight to the (here broken) kernel
        prefix_attention(*_inputs())
    assert backend._PASSED == {}


def test_16_bit_inputs_need_bf16_hardware(auto_on_cpu, monkeypatch):
    monkeypatch.setattr(backend, "_bf16_capable", lambda device: False)  # as on a compute capability 7.x GPU
    assert backend.resolve("auto", "prefix_attention", CPU, torch.bfloat16, None) == "reference"
    monkeypatch.setattr(backend, "self_check_passed", lambda op, device, dtype: True)
    assert backend.resolve("auto", "prefix_attention", CPU, torch.float32, None) == "triton"


# ------------------------------------------------------------------------------------------------ native kernels


@pytest.fixture
def without_native(monkeypatch):
    """As on a machine where tpm_fast._C was not built."""
    monkeypatch.setattr(native, "_STATE", {"reason": "tpm_fast._C is not available (simulated)"})


def test_native_unavailable_auto_falls_back_and_forcing_it_says_why(without_native):
    assert backend.resolve("auto", "crf", CPU, torch.float32, None) == "reference"
    with pytest.raises(ValueError, match=r"backend='native': tpm_fast._C is not available \(simulated\)"):
        backend.resolve("native", "crf", CPU, torch.float32, None)
    q = _inputs()
    assert torch.equal(prefix_attention(*q), reference(*q))


def test_native_rules():
    if backend.native_unavailable_reason() is not None:
        pytest.skip("tpm_fast._C is not built here")
    assert backend.resolve("native", "prefix_attention", CPU, torch.float32, None) == "native"
    assert backend.resolve("auto", "prefix_attention", CPU, torch.float32, None) == "native"
    assert backend.resolve("auto", "prefix_attention", CPU, torch.float64, None) == "reference"  # not native's dtype
    assert backend.resolve("auto", "crf", CPU, torch.float16, None) == "native"
    with pytest.raises(ValueError, match="takes"):
        backend.resolve("native", "prefix_attention", CPU, torch.float16, None)
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="prefix_attention kernels run on CPU tensors"):
        backend.resolve("native", "prefix_attention", cuda, torch.float32, None)
    if not native.has_cuda():
        with pytest.raises(ValueError, match="built without CUDA"):
            backend.resolve("native", "crf", cuda, torch.float32, None)


def test_native_cuda_crf_rules(monkeypatch):
    """Where tpm_fast._C has the CUDA CRF: "native" takes what the Triton CRF takes; "auto" picks it on CUDA only
    for the ops in AUTO_CUDA_NATIVE (none until GPU figures exist), else Triton."""
    if backend.native_unavailable_reason() is not None:
        pytest.skip("tpm_fast._C is not built here")
    monkeypatch.setattr(native, "has_cuda", lambda: True)
    monkeypatch.setenv("TPM_FAST_SELF_CHECK", "0")
    cuda = torch.device("cuda")
    assert backend.resolve("native", "crf", cuda, torch.bfloat16, None) == "native"
    too_many = backend.crf_unsupported(torch.float32, backend.MAX_TAGS + 1)
    with pytest.raises(ValueError, match=f"at most {backend.MAX_TAGS}"):
        backend.resolve("native", "crf", cuda, torch.float32, too_many)
    assert backend.resolve("auto", "crf", cuda, torch.float32, None) == "triton"
    monkeypatch.setattr(backend, "AUTO_CUDA_NATIVE", ("crf",))
    assert backend.resolve("auto", "crf", cuda, torch.float32, None) == "native"
    assert backend.resolve("auto", "crf", cuda, torch.float32, too_many) == "reference"
    assert backend.resolve("auto", "prefix_attention", cuda, torch.float32, None) == "triton"
