"""Helpers shared by several test files: a brute-force CRF oracle and a tiny HF BERT (imported as tests.oracles)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from transformers import BertConfig, BertModel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the backend="triton" tests run: the GPU when there is one (compiled kernels), else the CPU interpreter."""


def brute_force_crf(em, mask, start, end, trans):
    """All tag paths of each sequence enumerated (differentiable; use fp64): (log Z (B,), best path per sequence)."""
    log_z, best = [], []
    for i in range(em.shape[0]):
        n_i = int(mask[i].sum())
        paths = torch.tensor(list(itertools.product(range(em.shape[2]), repeat=n_i)))  # shape: (P, n_i)
        score = start[paths[:, 0]] + end[paths[:, -1]] + em[i, torch.arange(n_i), paths].sum(1)
        score = score + trans[paths[:, :-1], paths[:, 1:]].sum(1)  # shape: (P,)
        log_z.append(torch.logsumexp(score, 0))
        best.append(paths[score.argmax()].tolist())
    return torch.stack(log_z), best


def tiny_bert(layers: int = 2, heads: int = 2, head_dim: int = 16, attn: str = "eager", vocab: int = 50) -> BertModel:
    """A randomly initialized BERT without dropout or pooler (seeded: the same weights at every call)."""
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * heads * head_dim,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False)


def confident_crf_case(seed: int, b: int = 8, n: int = 60, t: int = 9, margin: float = 8.0):
    """A CRF batch like a trained tagger's: emissions favour the gold tags by ``margin`` (so -log-likelihood is
    ~0.01-1 per sequence while the path scores reach several hundred), ragged lengths up to ``n``, T ``t``.

    Returns (emissions (B, n, T) fp32, tags (B, n) long, -100 on padding, mask (B, n) bool, [start, end,
    transitions] fp32). Here a kernel's gradient is the small difference between the gold one-hot and marginals
    near 1: kernels that lose fp32 bits to the alphas' magnitude or to ``1 - gamma`` show it (~1e-3 relative).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = torch.arange(n) < lengths.unsqueeze(1)  # shape: (B, n)
    tags = torch.randint(0, t, (b, n), generator=g)
    em = torch.randn(b, n, t, generator=g) + margin * torch.nn.functional.one_hot(tags, t)  # shape: (B, n, T)
    params = [torch.randn(*s, generator=g) * 0.3 for s in ((t,), (t,), (t, t))]
    return em, tags.masked_fill(~mask, -100), mask, params


def crf_grad_errors(em, tags, mask, params, backend: str, device: str = "cpu") -> list[float]:
    """Relative errors (norm of the difference / norm) of -mean log-likelihood's gradients w.r.t. emissions, start, end
    and transitions computed by ``backend`` on ``device`` in fp32, against the fp64 reference."""
    from tpm_fast.ops.crf import crf_log_likelihood

    grads = {}
    for name, dtype, dev in (("fp64", torch.float64, "cpu"), (backend, torch.float32, device)):
        leaves = [x.detach().to(dev, dtype).requires_grad_(True) for x in [em, *params]]
        chosen = "reference" if name == "fp64" else backend
        llh = crf_log_likelihood(leaves[0], tags.to(dev), mask.to(dev), *leaves[1:], backend=chosen)
        grads[name] = [x.double().cpu() for x in torch.autograd.grad(-llh.mean(), leaves)]
    return [((a - b).norm() / b.norm()).item() for a, b in zip(grads[backend], grads["fp64"])]


def crf_inputs(b, n, t, seed, dtype=torch.float32, scale=1.0, trans_scale=1.0, lengths=None, device="cpu"):
    """A random CRF batch: emissions (B, n, T) in ``dtype`` (times ``scale``), fp32 params [start (T,), end (T,),
    transitions (T, T)] (times ``trans_scale``), a left-aligned bool mask (default lengths: random, row 0 full, the
    last row of length 1) and tags (-100 on padding), all on ``device``."""
    g = torch.Generator().manual_seed(seed)
    em = (torch.randn(b, n, t, generator=g) * scale).to(dtype)
    params = [torch.randn(*s, generator=g) * trans_scale for s in ((t,), (t,), (t, t))]
    if lengths is None:
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        lengths[0] = n
        if b > 1:
            lengths[-1] = 1
    mask = torch.arange(n) < torch.as_tensor(lengths).unsqueeze(1)  # shape: (B, n)
    tags = torch.randint(0, t, (b, n), generator=g).masked_fill(~mask, -100)  # shape: (B, n)
    return em.to(device), tags.to(device), mask.to(device), [p.to(device) for p in params]


def viterbi_tie_case(seed: int, b: int = 9, n: int = 12, t: int = 4):
    """Emissions (B, n, T) and params [start, end, transitions] of small integers in {-1, 0, 1} (many exact ties
    between paths), and a left-aligned bool mask (B, n) with random lengths; fp32, CPU."""
    g = torch.Generator().manual_seed(seed)
    em = torch.randint(-1, 2, (b, n, t), generator=g).float()
    params = [torch.randint(-1, 2, s, generator=g).float() for s in ((t,), (t,), (t, t))]
    mask = torch.arange(n) < torch.randint(1, n + 1, (b,), generator=g).unsqueeze(1)
    mask[:, 0] = True
    return em, mask, params


# (b, h, n, n_k, m, d): odd / prime n, n_k != n, m in {0, 1, 4, 16}, d in {16, 32, 64, 128}
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 7, 7, 4, 32),
    (3, 1, 37, 37, 16, 32),
    (2, 1, 37, 37, 1, 64),
    (2, 2, 7, 19, 4, 16),
    (3, 1, 19, 5, 0, 32),
    (2, 1, 17, 17, 3, 128),
]
"""Prefix-attention shapes every kernel is checked on."""


def attention_inputs(b, h, n, n_k, m, d, seed, dtype=torch.float32, qk_scale=1.0, device="cpu"):
    """Fresh random q (B, H, n, d), k, v (B, H, n_k, d), k_p, v_p (B, H, m, d) in ``dtype`` on ``device`` (q and
    the keys times ``qk_scale``)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * qk_scale
    k = torch.randn(b, h, n_k, d, generator=g) * qk_scale
    v = torch.randn(b, h, n_k, d, generator=g)
    k_p = torch.randn(b, h, m, d, generator=g) * qk_scale
    v_p = torch.randn(b, h, m, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, k_p, v_p)]


def max_err(x, ref) -> float:
    """Largest absolute difference (0 for empty tensors)."""
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def max_abs(x) -> float:
    """Largest magnitude (0 for empty tensors)."""
    return x.abs().max().item() if x.numel() else 0.0


def native_cuda_crf_unavailable() -> str | None:
    """Why the native CUDA CRF cannot run here (no GPU, tpm_fast._C not built or built without CUDA), else None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from tpm_fast.ops.backend import native_unsupported

    return native_unsupported("crf", torch.device("cuda"), torch.float32)


def philox_uniform(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """triton.language.rand4x(seed, counters) in numpy: the four words of Philox 4x32-10 on counter (lo, hi, 0, 0)
    under key (seed lo, seed hi), each through uint_to_uniform_float (fp32 in [0, 1)); word 0 is tl.rand."""
    low = np.uint64(0xFFFFFFFF)
    counters = counters.astype(np.uint64)
    c0, c1 = counters & low, counters >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        a, b = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # 32 x 32 bits: exact in uint64
        c0, c2, c1, c3 = (b >> np.uint64(32)) ^ c1 ^ k0, (a >> np.uint64(32)) ^ c3 ^ k1, b & low, a & low
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    words = []
    for word in (c0, c1, c2, c3):
        x = word.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)  # -x - 1 without overflow
        words.append(x.astype(np.float32) * np.float32(4.6566127342e-10))
    return words
