"""Tests for kit.precision: the policy per device (facts injected, so every GPU case runs on a CPU),
TF32 flags, the GPU probe's errors, the gradient-scaler training step (fp16 autocast on the CPU,
with an fp16 overflow that must skip the step) and the gradient-checkpointing rule."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn

from kit import backbones, models
from kit import precision as P
from kit.precision import DeviceFacts, GradientOverflowError, Precision, PrecisionError

CPU = DeviceFacts("cpu")
GTX1080 = DeviceFacts("cuda", (6, 1), 7.9, "NVIDIA GeForce GTX 1080")
V100 = DeviceFacts("cuda", (7, 0), 15.8, "Tesla V100-SXM2-16GB")
T4 = DeviceFacts("cuda", (7, 5), 14.6, "Tesla T4")
A100 = DeviceFacts("cuda", (8, 0), 39.4, "NVIDIA A100-SXM4-40GB")
RTX3090 = DeviceFacts("cuda", (8, 6), 23.6, "NVIDIA GeForce RTX 3090")
L4 = DeviceFacts("cuda", (8, 9), 22.0, "NVIDIA L4")
H100 = DeviceFacts("cuda", (9, 0), 79.1, "NVIDIA H100 80GB HBM3")


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# The policy


@pytest.mark.parametrize(
    ("facts", "mode", "tf32"),
    [
        (CPU, "fp32", None),
        (GTX1080, "fp32", False),
        (V100, "fp16", False),
        (T4, "fp16", False),
        (A100, "bf16", True),
        (RTX3090, "bf16", True),
        (L4, "bf16", True),
        (H100, "bf16", True),
    ],
    ids=lambda v: v.name or v.type if isinstance(v, DeviceFacts) else str(v),
)
def test_auto_policy_by_capability(facts, mode, tf32, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    prec = P.resolve("auto", facts=facts)
    assert prec.mode == mode and prec.device_type == facts.type
    assert prec.uses_scaler == (mode == "fp16")
    assert prec.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mode]
    if tf32 is None:  # the CPU: the CUDA flags are left alone
        assert prec.tf32 is False and torch.backends.cuda.matmul.allow_tf32 is True
    else:
        assert prec.tf32 is tf32
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert P.resolve(None, facts=facts).mode == mode


def test_tf32_can_be_turned_off(restore_tf32):
    prec = P.resolve("auto", facts=A100, tf32=False)
    assert prec.mode == "bf16" and not prec.tf32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not P.resolve("auto", facts=T4, tf32=True).tf32  # no TF32 before Ampere


def test_forced_precisions(restore_tf32):
    for facts in (CPU, T4, A100):
        assert P.resolve("fp32", facts=facts).mode == "fp32"
    assert P.resolve("fp16", facts=A100).mode == "fp16"
    assert P.resolve("fp16", facts=V100).uses_scaler
    assert P.resolve("bf16", facts=CPU).mode == "bf16"
    with pytest.warns(UserWarning, match=r"Tesla T4.*no native bf16.*'auto' picks fp16"):
        assert P.resolve("bf16", facts=T4).mode == "bf16"
    with pytest.raises(PrecisionError, match=r"fp16 was asked for on the CPU.*precision='fp32'"):
        P.resolve("fp16", facts=CPU)
    with pytest.raises(PrecisionError, match=r"unknown precision 'float16': expected one of auto, bf16"):
        P.resolve("float16", facts=CPU)
    mps = DeviceFacts("mps")
    assert P.resolve("auto", facts=mps).mode == "fp32"
    with pytest.raises(PrecisionError, match="bf16 was asked for on device 'mps'"):
        P.resolve("bf16", facts=mps)
    with pytest.raises(ValueError, match="compute capability"):
        DeviceFacts("cuda")


def test_describe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t4 = P.resolve("auto", facts=T4)
    assert t4.describe() == (
        "fp16 autocast + gradient scaler on cuda (Tesla T4, compute capability 7.5, 14.6 GiB); "
        "auto: no native bf16 before compute capability 8.0 (7.5); TF32 off"
    )
    a100 = P.resolve("auto", facts=A100)
    assert a100.describe().startswith("bf16 autocast on cuda (NVIDIA A100-SXM4-40GB, compute capability 8.0")
    assert a100.describe().endswith("TF32 matmuls on")
    assert P.resolve("auto", facts=CPU).describe() == "fp32 on cpu; auto: the CPU trains in fp32"
    assert "fp32" in repr(P.resolve("auto", facts=CPU))


# ----------------------------------------------------------------------------------------------
# Probing the device


def test_probe_cpu():
    facts = DeviceFacts.probe("cpu")
    assert facts.type == "cpu" and facts.capability is None and not facts.is_gpu
    assert P.resolve("auto", "cpu").mode == "fp32"


def test_probe_gpu_absent_names_what_was_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PrecisionError, match=r"device 'cuda:1' was asked for but torch sees no CUDA GPU"):
        DeviceFacts.probe("cuda:1")
    with pytest.raises(PrecisionError, match=r"device 'cuda' was asked for"):
        P.resolve("auto", "cuda")
    assert DeviceFacts.probe(None).type == "cpu"  # no device asked for: the CPU


def test_probe_gpu_facts(monkeypatch):
    props = types.SimpleNamespace(major=7, minor=5, total_memory=15_655_829_504, name="Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    facts = DeviceFacts.probe("cuda")
    assert facts == DeviceFacts("cuda", (7, 5), pytest.approx(14.58, abs=0.01), "Tesla T4", 0)
    assert DeviceFacts.probe(None).type == "cuda"
    with pytest.raises(PrecisionError, match=r"device 'cuda:2' was asked for but torch sees 1 GPU\(s\)"):
        DeviceFacts.probe("cuda:2")


# ----------------------------------------------------------------------------------------------
# Training steps: the gradient-scaler path runs for real with fp16 autocast on the CPU


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))


def batch(scale=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def loss_of(model, prec, x, y):
    with prec.autocast():
        logits = model(x)
    assert logits.dtype == prec.dtype  # the forward really ran in the autocast dtype
    return nn.functional.cross_entropy(logits.float(), y)  # backward() runs outside autocast


def test_fp16_scaler_step_on_cpu():
    prec = Precision("fp16", "cpu")
    assert prec.scaler.is_enabled() and prec.scaler.get_scale() == 2.0**16
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()

    # Reference: the same fp16 forward, gradients without scaling.
    reference = tiny_model()
    loss_of(reference, prec, x, y).backward()
    loss = loss_of(model, prec, x, y)
    scaled = prec.scale(loss)
    assert scaled.item() == pytest.approx(loss.item() * 2.0**16, rel=1e-6)
    scaled.backward()
    prec.unscale_(optimizer)
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-3, atol=1e-6)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    assert torch.isfinite(norm)
    before = [p.detach().clone() for p in model.parameters()]
    assert prec.step(optimizer) is True
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert prec.scaler.get_scale() == 2.0**16 and prec.skipped_steps == 0

    # A few more steps learn the batch.
    first = loss.item()
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        prec.scale(loss_of(model, prec, x, y)).backward()
        prec.unscale_(optimizer)
        assert prec.step(optimizer)
    assert loss_of(model, prec, x, y).item() < 0.5 * first


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    prec = Precision("fp16", "cpu")
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()
    prec.scale(loss_of(model, prec, x, y)).backward()
    prec.unscale_(optimizer)
    prec.step(optimizer)  # Adam state exists now
    state = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}

    optimizer.zero_grad(set_to_none=True)
    big_x, _ = batch(scale=1e4)  # the scaled fp16 backward passes 65504: inf/NaN gradients
    prec.scale(loss_of(model, prec, big_x, y)).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    prec.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    before = [p.detach().clone() for p in model.parameters()]
    assert prec.step(optimizer) is False
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # weights unchanged
    for key, value in optimizer.state[model[0].weight].items():
        assert torch.equal(value, state[key])  # optimiser state unchanged
    assert prec.scaler.get_scale() == 2.0**15
    assert prec.skipped_steps == 1 and prec.consecutive_skips == 1

    # The next finite step is taken and resets the run of skips.
    optimizer.zero_grad(set_to_none=True)
    prec.scale(loss_of(model, prec, x, y)).backward()
    assert prec.step(optimizer) is True  # unscale_ is optional: step unscales when it was not called
    assert prec.consecutive_skips == 0 and prec.skipped_steps == 1


def test_repeated_overflow_raises_with_advice():
    prec = Precision("fp16", "cpu", max_consecutive_skips=3)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    big_x, y = batch(scale=1e4)
    x, _ = batch()

    def overflow_step():
        optimizer.zero_grad(set_to_none=True)
        prec.scale(loss_of(model, prec, big_x, y)).backward()
        return prec.step(optimizer)

    assert overflow_step() is False and overflow_step() is False
    optimizer.zero_grad(set_to_none=True)
    prec.scale(loss_of(model, prec, x, y)).backward()
    assert prec.step(optimizer)  # a good step in between: the count starts again
    assert overflow_step() is False and overflow_step() is False
    with pytest.raises(GradientOverflowError, match=r"3 optimiser steps in a row.*lower learning rate"):
        overflow_step()
    assert "precision='fp32'" in prec.overflow_advice()
    assert prec.scaler.get_scale() == 2.0**16 / 2**5


def test_bf16_and_fp32_steps_on_cpu():
    bf16 = P.resolve("bf16", facts=CPU)
    assert not bf16.scaler.is_enabled()
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    loss = loss_of(model, bf16, x, y)
    assert bf16.scale(loss) is loss
    loss.backward()
    bf16.unscale_(optimizer)  # a no-op without a scaler
    before = model[0].weight.detach().clone()
    assert bf16.step(optimizer) is True and not torch.equal(before, model[0].weight)

    fp32 = P.resolve("auto", facts=CPU)
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32.autocast():  # fp32 means fp32, even inside someone else's autocast
            assert (a @ a).dtype == torch.float32
    assert loss_of(model, fp32, x, y).dtype == torch.float32


def test_scaler_state_round_trip():
    prec = Precision("fp16", "cpu")
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    big_x, y = batch(scale=1e4)
    prec.scale(loss_of(model, prec, big_x, y)).backward()
    prec.step(optimizer)
    state = prec.state_dict()
    assert state["mode"] == "fp16"
    resumed = Precision("fp16", "cpu")
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == 2.0**15
    other = Precision("bf16", "cpu")
    other.load_state_dict(state)  # another mode ignores the fp16 scale
    assert other.state_dict() == {"mode": "bf16", "scaler": {}}


@pytest.mark.parametrize("name", ["beats", "eat", "fisher"])
def test_backbones_under_fp16_autocast(name):
    """What a T4 runs: the backbones' padding masks and front-ends must survive fp16 autocast."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = backbones.load(name, config="unit")
    waves = 0.1 * torch.randn(2, 16000)
    lengths = torch.tensor([16000, 9000])  # the second clip is padded
    prec = Precision("fp16", "cpu")
    model.eval()
    with torch.no_grad():
        reference, _ = model(waves, lengths)
        with prec.autocast():
            tokens, _ = model(waves, lengths)
    assert torch.isfinite(tokens).all()
    assert (tokens.float() - reference).abs().max() < 0.05 * reference.abs().max()
    model.train()
    with prec.autocast():
        tokens, mask = model(waves, lengths)
    loss = tokens.float()[~mask].pow(2).mean()
    prec.scale(loss).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.mark.parametrize(
    ("facts", "parameters", "seconds", "requested", "expected"),
    [
        (T4, 90_000_000, 16.0, None, True),  # EAT-ASP on Colab
        (V100, 90_000_000, 10.0, None, True),  # exactly 10 s counts as long
        (T4, 90_000_000, 5.0, None, False),  # short crops
        (T4, 22_000_000, 16.0, None, False),  # FISHER-small
        (T4, 90_000_000, None, None, True),  # whole clips of unknown length
        (L4, 90_000_000, 16.0, None, False),  # a 24-GB card
        (RTX3090, 90_000_000, 16.0, None, False),
        (A100, 300_000_000, 16.0, None, False),
        (DeviceFacts("cuda", (8, 9), 19.99, "RTX 4000 Ada 20 GB"), 90_000_000, 10.0, None, True),
        (CPU, 90_000_000, 16.0, None, False),
        (T4, 90_000_000, 16.0, False, False),  # overrides
        (CPU, 1_000, 1.0, True, True),
    ],
)
def test_gradient_checkpointing_rule(facts, parameters, seconds, requested, expected):
    got = P.use_gradient_checkpointing(requested, facts, parameters=parameters, crop_seconds=seconds)
    assert got is expected


def test_gradient_checkpointing_rule_inputs():

    assert models.count_parameters(nn.Linear(10, 3)) == 33
    with pytest.raises(ValueError, match=r"True, False or None \(auto\), got 'yes'"):
        P.use_gradient_checkpointing("yes", T4, parameters=1, crop_seconds=1.0)
