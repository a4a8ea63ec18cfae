"""Triton Viterbi kernel of the linear-chain CRF: max-plus recursion with torchcrf's sums and tie-breaking,
back-pointers in an int8 scratch buffer, backtrace in the kernel. Launched by
`tpm_fast.kernels.crf.launch_crf_viterbi`; conventions are in `tpm_fast.kernels.crf`.

NaN scores: every back-pointer read is clamped into [0, T), so the backtrace never leaves its row and every output
tag lies in [0, T) (padding 0); which path a NaN row gets is unspecified.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpm_fast.kernels.crf_fwd import _clamp_tag, _row_length


@triton.jit
def _crf_viterbi_kernel(
    em_ptr,  # shape: (B, n, T) emissions, any float dtype, last-dim stride 1
    mask_ptr,  # shape: (B, n) uint8, left-aligned
    start_ptr,  # shape: (T,) contiguous
    end_ptr,  # shape: (T,) contiguous
    trans_ptr,  # shape: (T, T) contiguous
    bp_ptr,  # shape: (B, n, T) int8 scratch: best previous tag, rows 1 .. length-1 (others never read)
    out_ptr,  # shape: (B, n) int64 out: best path, 0 on padding
    len_ptr,  # shape: (B,) int64 out: row lengths (number of nonzero mask entries, clamped to [1, n])
    n,
    T,
    stride_eb,
    stride_en,
    stride_mb,
    stride_mn,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    trans = tl.load(trans_ptr + offs[:, None] * T + offs[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    start = tl.load(start_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    length = _row_length(mask_ptr + b * stride_mb, stride_mn, n, BLOCK_N)
    tl.store(len_ptr + b, length.to(tl.int64))
    em_row = em_ptr + b * stride_eb
    bp_row = bp_ptr + b * n * T
    out_row = out_ptr + b * n

    score = start + tl.load(em_row + offs, mask=valid, other=float("-inf")).to(tl.float32)  # shape: (BT,)
    t = length * 0 + 1
    while t < length:
        em = tl.load(em_row + t * stride_en + offs, mask=valid, other=float("-inf")).to(tl.float32)
        nxt = (score[:, None] + trans) + em[None, :]  # shape: (BT, BT) same sums as torchcrf
        score, idx = tl.max(nxt, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(bp_row + t * T + offs, idx.to(tl.int8), mask=valid)
        t += 1
    _, best = tl.max(score + end, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.debug_barrier()  # back-pointers written by all threads must be visible to the scalar loads below
    cur = _clamp_tag(best, T)  # NaN scores may give any index: clamp (memory safety)
    tl.store(out_row + length - 1, cur.to(tl.int64))
    t = length - 1
    while t > 0:
        cur = _clamp_tag(tl.load(bp_row + t * T + cur), T)
        tl.store(out_row + t - 1, cur.to(tl.int64))
        t -= 1
    pos_offs = tl.arange(0, BLOCK_N)
    t = length
    while t < n:  # padding -> 0, BLOCK_N positions at a time
        pos = t + pos_offs
        tl.store(out_row + pos, tl.zeros([BLOCK_N], dtype=tl.int64), mask=pos < n)
        t += BLOCK_N
