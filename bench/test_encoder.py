"""One 12-layer prompted BERT-base encoder step (forward + backward): HF sdpa + ``DynamicCache`` vs ours.

``hf_sdpa_cache`` is what HVPNeT-style code runs (the prefix concatenated into every layer's K/V by the cache);
``prompted_<backend>`` is :func:`tpm_fast.prompted_bert` on that attention backend, as the model calls it:
``reference`` (the PyTorch reference, CPU only), ``native`` (the C++ CPU kernels, when built) and ``triton`` (CUDA
only). On CPU it skips the padding (packed); on CUDA it computes it unless given a token index: ``_padded`` /
``_packed`` force the other choice. Random weights of the BERT-base shape (d_t 768, H 12, d_h 64, FFN 3072), m = 4
prefix slots, lengths uniform in [n/2, n] (~25 % padding); the loss is over the real word pieces, as a tagger's is.
On CUDA, ``extra_info["peak_mb"]`` holds the step's peak allocated memory.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, DynamicCache

from tpm_fast.layers.prompted_bert import pack_index, prompted_bert
from tpm_fast.ops.backend import native_unavailable_reason

LAYERS, H, D, M = 12, 12, 64, 4
SHAPES = [(8, 64), pytest.param(32, 64, marks=pytest.mark.big), pytest.param(32, 128, marks=pytest.mark.big)]
PROVIDERS = [
    "hf_sdpa_cache",
    "prompted_reference",
    "prompted_native",
    "prompted_native_padded",
    "prompted_triton",
    "prompted_triton_packed",
]


def _bert(device, dtype) -> BertModel:
    config = BertConfig(
        hidden_size=H * D,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        intermediate_size=4 * H * D,
        attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False).to(device, dtype).train()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("b,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_step(bench, bench_device, dtype, b, n, provider):
    if dtype != torch.float32 and bench_device.type != "cuda":
        pytest.skip("bf16 encoder steps are only benchmarked on CUDA")
    backend, _, packing = provider.removeprefix("prompted_").partition("_")
    if backend in ("reference", "native") and bench_device.type == "cuda":
        pytest.skip(f"{backend} is a CPU path: not timed on CUDA")
    if backend == "triton" and bench_device.type != "cuda":
        pytest.skip("Triton kernels are timed on CUDA only")
    if backend == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    torch.manual_seed(0)
    bert = _bert(bench_device, dtype)
    ids = torch.randint(0, bert.config.vocab_size, (b, n), device=bench_device)
    lengths = torch.randint(n // 2, n + 1, (b,), device=bench_device)
    mask = torch.arange(n, device=bench_device) < lengths[:, None]  # shape: (B, n)
    prefix = [
        tuple(torch.randn(b, H, M, D, device=bench_device, dtype=dtype, requires_grad=True) for _ in range(2))
        for _ in range(LAYERS)
    ]
    real = mask[..., None] / (mask.sum() * bert.config.hidden_size)  # shape: (B, n, 1), the mean over real pieces
    full_mask = torch.cat([torch.ones(b, M, dtype=torch.long, device=bench_device), mask.long()], 1)

    pack = {"packed": True, "padded": False}.get(packing)
    index = pack_index(mask.cpu()).to(bench_device) if pack else None  # as a collate function would make it

    def step():
        if provider == "hf_sdpa_cache":
            cache = DynamicCache([(k, v) for k, v in prefix])  # a new cache per forward, as HVPNeT does
            hidden = bert(input_ids=ids, attention_mask=full_mask, cache=cache).last_hidden_state
        else:
            hidden = prompted_bert(bert, ids, mask, prefix, backend=backend, pack=pack, token_index=index)
        (hidden.float().square() * real).sum().backward()
        bert.zero_grad(set_to_none=True)

    info = {} if bench_device.type == "cuda" else {"rounds": 5}  # a CPU step takes seconds
    if bench_device.type == "cuda":
        step()  # warm-up (kernel compilation), then the peak of one step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        info["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    shape = {"B": b, "n": n, "m": M, "layers": LAYERS, "H": H, "d": D}
    bench(step, group=f"encoder-step-{str(dtype).removeprefix('torch.')}-B{b}-n{n}", provider=provider, dtype=dtype,
          shape=shape, **info)  # fmt: skip
