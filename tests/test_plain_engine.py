"""PlainEngine: the same update as a hand-written loop, checkpoints that resume exactly, bf16 with fp32 masters."""

import copy

import pytest
import torch
from torch import nn

from tpm_fast import plain_engine
from tpm_fast.engine import GuardedSteps
from tpm_fast.plain_engine import CHECKPOINT_FILE, PlainEngine


def setup(seed: int = 0, unused: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), *([nn.Linear(2, 2)] if unused else []))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, schedule


def batches(count: int = 5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=g) * 10 for _ in range(count)]


def loss_of(model, x):
    return model(x).square().mean()


def test_step_equals_a_plain_loop():
    model, optimizer, schedule = setup()
    engine = PlainEngine(model, optimizer, schedule, gradient_clipping=0.5)
    ref_model, ref_opt, ref_schedule = setup()
    for x in batches():
        engine.backward(loss_of(engine.module, x))
        engine.step()
        loss_of(ref_model, x).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref_opt.step()
        ref_schedule.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        assert p.grad is None  # dropped after the step


def test_checkpoint_resumes_exactly(tmp_path):
    model, optimizer, schedule = setup()
    engine = PlainEngine(model, optimizer, schedule, gradient_clipping=1.0)
    data = batches(6)
    for x in data[:3]:
        engine.backward(loss_of(model, x))
        engine.step()
    engine.save_checkpoint(tmp_path, "epoch1", {"epoch": 1})
    for x in data[3:]:
        engine.backward(loss_of(model, x))
        engine.step()
    other = PlainEngine(*setup(seed=7), gradient_clipping=1.0)
    path, client = other.load_checkpoint(tmp_path)
    assert path == str(tmp_path / "epoch1") and client == {"epoch": 1}
    for x in data[3:]:
        other.backward(loss_of(other.module, x))
        other.step()
    for p, q in zip(model.parameters(), other.module.parameters()):
        assert torch.equal(p, q)
    assert not list(tmp_path.rglob("*.tmp"))  # written under a temporary name, then renamed


def test_missing_and_foreign_checkpoints(tmp_path):
    engine = PlainEngine(*setup())
    assert engine.load_checkpoint(tmp_path) == (None, {})
    (tmp_path / "epoch1").mkdir()
    (tmp_path / "epoch1" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("epoch1")
    with pytest.raises(ValueError, match="DeepSpeed engine"):
        engine.load_checkpoint(tmp_path)
    assert not (tmp_path / "epoch1" / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("chunk", [plain_engine.MASTER_CHUNK, 20])
def test_bf16_weights_update_fp32_masters_as_a_hand_written_loop(monkeypatch, chunk):
    """bf16 module, fp32 masters: each step = bf16 forward/backward, gradients to fp32, clip, AdamW on the masters,
    masters rounded back into the module; an unused layer (no gradient) is left alone. ``chunk`` 20: the masters
    are updated a parameter or two at a time."""
    monkeypatch.setattr(plain_engine, "MASTER_CHUNK", chunk)
    model, optimizer, schedule = setup(unused=True)  # model[3] is never called: its parameters get no gradient
    engine = PlainEngine(model, optimizer, schedule, gradient_clipping=0.5, dtype=torch.bfloat16)
    master, ref_opt, ref_schedule = setup(unused=True)
    master.load_state_dict(engine.fp32_state_dict())
    start = {k: v.clone() for k, v in master.state_dict().items()}
    for x in batches():
        out = engine.module[:3](x.bfloat16())
        assert out.dtype == torch.bfloat16
        engine.backward(out.float().square().mean())
        engine.step()
        compute = copy.deepcopy(master).bfloat16()
        compute[:3](x.bfloat16()).float().square().mean().backward()
        for p, q in zip(master.parameters(), compute.parameters()):
            p.grad = None if q.grad is None else q.grad.float()
        torch.nn.utils.clip_grad_norm_(master.parameters(), 0.5)
        ref_opt.step()
        ref_schedule.step()
        ref_opt.zero_grad(set_to_none=True)
    exported = engine.fp32_state_dict()
    for k, v in master.state_dict().items():
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], v), k
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for p, q in zip(model.parameters(), master.parameters()):
        assert torch.equal(p, q.bfloat16()) and p.grad is None
    assert torch.equal(exported["3.weight"], start["3.weight"])


def test_bf16_checkpoint_keeps_the_fp32_masters(tmp_path):
    model, optimizer, schedule = setup()
    engine = PlainEngine(model, optimizer, schedule, dtype=torch.bfloat16)
    data = batches(4)
    for x in data[:2]:
        engine.backward(loss_of(model, x.bfloat16()).float())
        engine.step()
    engine.save_checkpoint(tmp_path, "epoch1")
    saved = engine.fp32_state_dict()
    other = PlainEngine(*setup(seed=3), dtype=torch.bfloat16)
    other.load_checkpoint(tmp_path)
    for k, v in other.fp32_state_dict().items():
        assert torch.equal(v, saved[k])  # not the bf16-rounded weights
    for x in data[2:]:
        for e in (engine, other):
            e.backward(loss_of(e.module, x.bfloat16()).float())
            e.step()
    for (k, v), w in zip(engine.fp32_state_dict().items(), other.fp32_state_dict().values()):
        assert torch.equal(v, w), k


def test_bf16_needs_a_fresh_optimizer():
    model, optimizer, schedule = setup()
    loss_of(model, batches(1)[0]).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="fresh optimizer"):
        PlainEngine(model, optimizer, schedule, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype,clip", [(torch.float32, 1.0), (torch.float32, 0.0), (torch.bfloat16, 1.0)])
def test_nonfinite_gradients_skip_the_step(dtype, clip):
    """A NaN or inf gradient: step() returns False, drops the gradients and changes no weight, optimizer state or
    schedule; the next finite step is applied."""
    model, optimizer, schedule = setup()
    engine = PlainEngine(model, optimizer, schedule, gradient_clipping=clip, dtype=dtype)
    x = batches(1)[0].to(dtype)
    engine.backward(loss_of(model, x).float())
    assert engine.step()
    before = copy.deepcopy((engine.fp32_state_dict(), optimizer.state_dict(), schedule.state_dict()))
    for bad in (float("nan"), float("inf")):
        engine.backward(loss_of(model, x).float() * bad)
        assert not engine.step()
        assert all(p.grad is None for p in model.parameters())
        weights, opt_state, sched_state = engine.fp32_state_dict(), optimizer.state_dict(), schedule.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in before[0].items())
        for i, s in before[1]["state"].items():
            assert all(torch.equal(opt_state["state"][i][k], v) for k, v in s.items())
        assert sched_state == before[2]
    engine.backward(loss_of(model, x).float())
    assert engine.step() and schedule.state_dict()["last_epoch"] == before[2]["last_epoch"] + 1


def test_accumulated_micro_batches_step_as_one_batch():
    """GuardedSteps with 2 micro-batches of 4: the update of one batch of 8 (mean loss); a NaN in the second
    micro-batch skips the whole step."""
    data = torch.cat(batches(2))
    one = PlainEngine(*setup(), gradient_clipping=0.5)
    assert GuardedSteps(one).backward(loss_of(one.module, data), 1, True)[1]
    two = PlainEngine(*setup(), gradient_clipping=0.5)
    steps = GuardedSteps(two, accumulation=2)
    assert steps.backward(loss_of(two.module, data[:4]), 2, False) is None
    mean, applied = steps.backward(loss_of(two.module, data[4:]), 2, True)
    assert applied and mean == pytest.approx(loss_of(setup()[0], data).item(), rel=1e-6)
    for p, q in zip(one.module.parameters(), two.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in two.module.parameters()]
    assert steps.backward(loss_of(two.module, data[:4]), 2, False) is None
    mean, applied = steps.backward(loss_of(two.module, data[4:]) * float("nan"), 2, True)
    assert not applied and all(torch.equal(p, q) for p, q in zip(two.module.parameters(), before))


def test_without_the_nonfinite_check_every_step_is_applied():
    """skip_nonfinite=False (a step free of host reads): a NaN gradient reaches the weights."""
    model, optimizer, schedule = setup()
    engine = PlainEngine(model, optimizer, schedule, skip_nonfinite=False)
    engine.backward(loss_of(model, batches(1)[0]) * float("nan"))
    assert engine.step() and all(p.isnan().all() for p in model.parameters())
