"""tpm_fast.layers.crf.CRF is a drop-in for torchcrf.CRF."""

from __future__ import annotations

import pytest
import torch
import torchcrf

from tests.oracles import DEVICE
from tpm_fast.layers.crf import CRF


def _pair(t, batch_first, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    ref = torchcrf.CRF(t, batch_first=batch_first)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = CRF(t, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    return ours.to(dtype), ref.to(dtype)


def _batch(b, n, t, batch_first, seed, full_mask=False):
    g = torch.Generator().manual_seed(seed)
    em = torch.randn(b, n, t, generator=g, dtype=torch.float64)
    tags = torch.randint(0, t, (b, n), generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = torch.arange(n) < lengths.unsqueeze(1)  # shape: (B, n)
    if full_mask:
        mask[:] = True
    if not batch_first:
        em, tags, mask = em.transpose(0, 1), tags.t(), mask.t()
    return em.contiguous(), tags.contiguous(), mask.contiguous()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("b,n,t", [(1, 1, 10), (6, 11, 10), (13, 7, 3)])
def test_forward_backward_decode_match_pytorch_crf(b, n, t, batch_first, reduction):
    ours, ref = _pair(t, batch_first, seed=b + n + t)
    em, tags, mask = _batch(b, n, t, batch_first, seed=n * t)
    em_ours = em.clone().requires_grad_(True)
    em_ref = em.clone().requires_grad_(True)
    out = ours(em_ours, tags, mask, reduction=reduction)
    expected = ref(em_ref, tags, mask, reduction=reduction)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(em_ours.grad, em_ref.grad, rtol=1e-10, atol=1e-12)
    for name, p in ours.named_parameters():
        expected_grad = getattr(ref, name).grad  # torchcrf leaves transitions.grad None when n == 1
        expected_grad = torch.zeros_like(p) if expected_grad is None else expected_grad
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert ours.decode(em, mask) == ref.decode(em, mask)


@pytest.mark.filterwarnings("ignore:where received a uint8")  # torchcrf's own default mask
@pytest.mark.parametrize("batch_first", [True, False])
def test_default_mask_and_tensor_decode(batch_first):
    ours, ref = _pair(5, batch_first, seed=3, dtype=torch.float32)
    em, tags, mask = _batch(4, 9, 5, batch_first, seed=4, full_mask=True)
    em = em.float()
    torch.testing.assert_close(ours(em, tags), ref(em, tags), rtol=1e-5, atol=1e-4)
    paths, lengths = ours.decode(em, mask, as_tensor=True)
    assert paths.shape == (4, 9) and paths.dtype == torch.long and lengths.tolist() == [9] * 4
    assert paths.tolist() == ref.decode(em) == ours.decode(em)


def test_tensor_decode_pads_with_zero():
    ours, ref = _pair(4, True, seed=8)
    em, _, mask = _batch(5, 7, 4, True, seed=9)
    paths, lengths = ours.decode(em, mask, as_tensor=True)
    assert lengths.tolist() == mask.sum(1).tolist()
    assert (paths[~mask] == 0).all()
    assert [row[:k] for row, k in zip(paths.tolist(), lengths.tolist())] == ref.decode(em, mask)


def test_parameters_and_state_dict_round_trip():
    torch.manual_seed(0)
    crf = CRF(7)
    assert [n for n, _ in crf.named_parameters()] == ["start_transitions", "end_transitions", "transitions"]
    assert all(p.abs().max() <= 0.1 for p in crf.parameters())
    assert crf.transitions.shape == (7, 7) and not crf.batch_first
    ref = torchcrf.CRF(7)
    ref.load_state_dict(crf.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), crf.parameters()))


@pytest.mark.parametrize(
    "case,msg",
    [
        ("num_tags", "invalid number of tags"),
        ("reduction", "invalid reduction"),
        ("emissions_dims", "emissions must be 3-d"),
        ("num_tags_mismatch", "last dim 4"),
        ("first_off", "first timestep"),
        ("tag_range", "tags under the mask"),
        ("tag_dtype", "torch.long"),
        ("mask_dtype", "mask must be bool"),
    ],
)
def test_bad_inputs_raise_clear_errors(case, msg):
    crf = CRF(4, batch_first=True)
    em, tags, mask = _batch(3, 5, 4, True, seed=1, full_mask=True)
    em = em.float()
    kwargs = {}
    if case == "num_tags":
        with pytest.raises(ValueError, match=msg):
            CRF(0)
        return
    if case == "reduction":
        kwargs["reduction"] = "avg"
    elif case == "emissions_dims":
        em = em[0]
    elif case == "num_tags_mismatch":
        em = em[..., :3]
    elif case == "first_off":
        mask[2, 0] = False
    elif case == "tag_range":
        tags[1, 1] = -1
    elif case == "tag_dtype":
        tags = tags.float()
    elif case == "mask_dtype":
        mask = mask.float()
    with pytest.raises(ValueError, match=msg):
        crf(em, tags, mask, **kwargs)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_triton_backend_matches_pytorch_crf(batch_first, reduction):
    ours, ref = _pair(6, batch_first, seed=21, dtype=torch.float32)
    ours.backend = "triton"
    ours.to(DEVICE)
    em, tags, mask = _batch(5, 8, 6, batch_first, seed=22)
    em = em.float()
    em_ours = em.clone().to(DEVICE).requires_grad_(True)
    em_ref = em.clone().requires_grad_(True)
    out = ours(em_ours, tags.to(DEVICE), mask.to(DEVICE), reduction=reduction)
    expected = ref(em_ref, tags, mask, reduction=reduction)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(em_ours.grad.cpu(), em_ref.grad, rtol=1e-5, atol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), getattr(ref, name).grad, rtol=1e-5, atol=1e-5)
    assert ours.decode(em.to(DEVICE), mask.to(DEVICE)) == ref.decode(em, mask)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mask_checked_on_every_backend(backend):
    crf = CRF(4, batch_first=True, backend=backend).to(DEVICE)
    em, tags, mask = (x.to(DEVICE) for x in _batch(3, 5, 4, True, seed=1))
    mask[1, 0] = False
    with pytest.raises(ValueError, match="first timestep"):
        crf(em.float(), tags, mask)
    mask[1, 0], mask[0, 2] = True, False  # row 0 is full length: now a hole
    with pytest.raises(ValueError, match="left-aligned"):
        crf.decode(em.float(), mask, as_tensor=True)


BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "X"]


def test_from_labels_bio_allowed_moves():
    crf = CRF.from_labels(BIO, batch_first=True)
    allowed = crf.allowed_transitions
    for i, a in enumerate(BIO):
        for j, b in enumerate(BIO):
            expected = not b.startswith("I-") or a in (f"B-{b[2:]}", b)
            assert bool(allowed[i, j]) == expected, (a, b)
    assert crf.allowed_start.tolist() == [True, True, False, True, False, True]
    assert "constrained" in repr(crf)
    assert set(crf.state_dict()) == {"start_transitions", "end_transitions", "transitions"}  # torchcrf's keys
    with pytest.raises(ValueError, match="tagging scheme"):
        CRF.from_labels(BIO, scheme="BIOES")


def _all_paths(t, n):
    return torch.cartesian_prod(*[torch.arange(t)] * n).view(-1, n) if n > 1 else torch.arange(t).view(-1, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_from_labels_constrains_training_and_decoding(backend):
    labels = BIO[:5]
    crf = CRF.from_labels(labels, batch_first=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    n = 4
    em = torch.randn(2, n, 5, generator=g) * 3
    em[:, :, 2] += 4  # make I-PER tempting everywhere, also at the start and after O
    start, end, trans = (p.detach().clone() for p in (crf.start_transitions, crf.end_transitions, crf.transitions))
    allowed_start, allowed = crf.allowed_start.clone(), crf.allowed_transitions.clone()
    paths = _all_paths(5, n)  # shape: (5**n, n)
    valid = paths[allowed_start[paths[:, 0]] & allowed[paths[:, :-1], paths[:, 1:]].all(1)]
    crf.to(DEVICE)
    for b in range(2):
        s = start[valid[:, 0]] + end[valid[:, -1]]
        s = s + em[b].gather(1, valid.t()).sum(0) + trans[valid[:, :-1], valid[:, 1:]].sum(1)  # shape: (paths,)
        assert crf.decode(em[b : b + 1].to(DEVICE))[0] == valid[s.argmax()].tolist()
        gold = valid[len(valid) // 3].unsqueeze(0)
        llh = crf(em[b : b + 1].to(DEVICE), gold.to(DEVICE), reduction="none")
        expected = s[len(valid) // 3] - torch.logsumexp(s, 0)  # normalized over the allowed paths only
        torch.testing.assert_close(llh[0].cpu(), expected, rtol=1e-5, atol=1e-4)
    loss = -crf(em.to(DEVICE), valid[:2].to(DEVICE), reduction="sum")
    loss.backward()
    grad_trans, grad_start = crf.transitions.grad.cpu(), crf.start_transitions.grad.cpu()
    assert (grad_trans[~allowed] == 0).all() and (grad_start[~allowed_start] == 0).all()
    assert grad_trans[allowed].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_validate_false_passes_through(backend):
    """validate=False reaches the op: nothing is checked on either backend (a first-off mask runs)."""
    crf = CRF(4, batch_first=True, backend=backend).to(DEVICE)
    em, tags, mask = (x.to(DEVICE) for x in _batch(3, 5, 4, True, seed=1))
    mask[1, 0] = False
    assert crf(em.float(), tags, mask, reduction="none", validate=False).shape == (3,)
    assert crf.decode(em.float(), mask, as_tensor=True, validate=False)[0].shape == (3, 5)


def test_parametrized_parameters_are_used():
    """`CRF._params` reads the parameters from the module's dicts on the hot path; a parametrization
    (torch.nn.utils.parametrize) moves one out of them, and the CRF then reads it through the attribute."""
    from torch.nn.utils import parametrize

    class Halved(torch.nn.Module):
        def forward(self, x):
            return x / 2

    ours, ref = _pair(5, True, seed=3)
    em, tags, mask = _batch(4, 6, 5, True, seed=4)
    parametrize.register_parametrization(ours, "transitions", Halved())
    with torch.no_grad():
        ref.transitions /= 2
    torch.testing.assert_close(ours(em, tags, mask), ref(em, tags, mask), rtol=1e-11, atol=1e-11)
    assert ours.decode(em, mask) == ref.decode(em, mask)
