import math

import pytest
import torch
import torch.nn.functional as F

from kit.losses import AdaCos, ArcFace, SubCenterArcFace, SubClusterAdaCos, make_loss


def _batch(n=12, dim=8, n_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(0, n_classes, (n,), generator=gen)


def test_margin_changes_only_the_true_class_logit():
    torch.manual_seed(0)
    emb, labels = _batch()
    with_margin, without = ArcFace(8, 5, s=30.0, m=0.5), ArcFace(8, 5, s=30.0, m=0.0)
    without.load_state_dict(with_margin.state_dict())
    diff = with_margin.logits(emb, labels) - without.logits(emb, labels)
    is_true = F.one_hot(labels, 5).bool()
    assert torch.all(diff[~is_true] == 0)
    assert torch.all(diff[is_true] < 0)  # the margin always penalises the true class
    # Without labels (inference) there is no margin at all.
    torch.testing.assert_close(with_margin.logits(emb), without.logits(emb))


def test_true_class_logit_is_cos_theta_plus_m():
    torch.manual_seed(0)
    emb, labels = _batch()
    loss = ArcFace(8, 5, s=30.0, m=0.3)
    theta = torch.acos(F.normalize(emb) @ F.normalize(loss.weight.detach()).T)
    true_theta = theta.gather(1, labels[:, None]).squeeze(1)
    assert torch.all(true_theta + 0.3 < math.pi)  # the fallback does not apply to this batch
    got = loss.logits(emb, labels).detach().gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(got, 30.0 * torch.cos(true_theta + 0.3), atol=1e-3, rtol=1e-4)


def test_zero_margin_equals_scaled_cosine_softmax():
    torch.manual_seed(0)
    emb, labels = _batch()
    loss = ArcFace(8, 5, s=16.0, m=0.0)
    expected = F.cross_entropy(16.0 * F.normalize(emb) @ F.normalize(loss.weight).T, labels)
    torch.testing.assert_close(loss(emb, labels), expected)


def test_fallback_keeps_the_true_logit_decreasing_past_pi_minus_m():
    loss = ArcFace(2, 3, s=1.0, m=0.5)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    angles = torch.linspace(0.0, math.pi, 200)
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    true_logit = loss.logits(emb, torch.zeros(200, dtype=torch.long))[:, 0].detach()
    assert torch.all(true_logit[1:] <= true_logit[:-1] + 1e-6)
    easy = ArcFace(2, 3, s=1.0, m=0.5, easy_margin=True)
    easy.load_state_dict(loss.state_dict())
    easy_logit = easy.logits(emb, torch.zeros(200, dtype=torch.long))[:, 0].detach()
    obtuse = angles > math.pi / 2 + 1e-3
    torch.testing.assert_close(easy_logit[obtuse], torch.cos(angles[obtuse]), atol=1e-5, rtol=0)
    assert torch.all(easy_logit[~obtuse][1:] < torch.cos(angles[~obtuse][1:]))


@pytest.mark.parametrize("kind", ["arcface", "subcenter", "adacos"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["theta=0", "theta=pi"])
def test_gradients_are_finite_when_embedding_is_on_a_class_weight(kind, sign):
    torch.manual_seed(0)
    # A small scale, so the softmax does not saturate and the true class really receives a gradient.
    loss = make_loss(kind, 8, 4, m=0.5, **({} if kind == "adacos" else {"s": 4.0}))
    with torch.no_grad():  # class c: every sub-centre on basis vector c, so cos is exactly +-1 below
        loss.weight.view(4, loss.k, 8).copy_(torch.eye(8)[:4, None, :].expand(4, loss.k, 8))
    emb = (sign * 3.0 * torch.eye(8)[:2]).requires_grad_(True)
    labels = torch.tensor([0, 1])
    value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(loss.weight.grad).all()


def test_cosines_stay_float32_under_autocast():
    torch.manual_seed(0)
    encoder, loss = torch.nn.Linear(8, 8), ArcFace(8, 4)
    inputs, labels = _batch(n=6, n_classes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = encoder(inputs)
        assert emb.dtype == torch.bfloat16
        assert loss.cosine(emb).dtype == torch.float32
        value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(encoder.weight.grad).all()


def test_subcenter_with_one_centre_equals_arcface():
    torch.manual_seed(0)
    emb, labels = _batch()
    arc, sub = ArcFace(8, 5, s=30.0, m=0.4), SubCenterArcFace(8, 5, k=1, s=30.0, m=0.4)
    sub.load_state_dict(arc.state_dict())
    torch.testing.assert_close(sub(emb, labels), arc(emb, labels))


def test_subcenter_takes_the_nearest_centre_of_each_class():
    loss = SubCenterArcFace(2, 2, k=2, s=1.0, m=0.0)
    with torch.no_grad():  # class 0: centres at 0 and 90 degrees; class 1: 180 and 270 degrees
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    cos = loss.cosine(torch.tensor([[0.0, 2.0], [-1.0, -1.0]]))
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0], [-(0.5**0.5), 0.5**0.5]]), atol=1e-5, rtol=0)


def test_adacos_scale_starts_at_fixed_value_and_adapts_per_batch():
    torch.manual_seed(0)
    loss = AdaCos(8, 10)
    assert float(loss.s) == pytest.approx(math.sqrt(2) * math.log(9))
    emb_a, labels_a = _batch(n_classes=10, seed=1)
    emb_b, labels_b = _batch(n_classes=10, seed=2)
    scales = []
    for emb, labels in [(emb_a, labels_a), (emb_b, labels_b)]:
        fresh = AdaCos(8, 10)
        fresh.load_state_dict(loss.state_dict())
        fresh(emb, labels)
        scales.append(float(fresh.s))
    assert scales[0] != pytest.approx(math.sqrt(2) * math.log(9))
    assert scales[0] != pytest.approx(scales[1])
    # Eval mode and calls without labels leave the scale alone; the scale never gets a gradient.
    loss.eval()
    loss(emb_a, labels_a)
    loss.train()
    loss.logits(emb_a)
    assert float(loss.s) == pytest.approx(math.sqrt(2) * math.log(9))
    assert "s" in loss.state_dict() and not loss.s.requires_grad


@pytest.mark.parametrize("kind", ["arcface", "subcenter", "adacos"])
def test_training_on_separable_toy_data_reduces_the_loss(kind):
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat_interleave(16)
    inputs = centres[labels] + 0.3 * torch.randn(64, 16)
    encoder = torch.nn.Linear(16, 8)
    loss = make_loss(kind, 8, 4, m=0.3)
    optimiser = torch.optim.Adam([*encoder.parameters(), *loss.parameters()], lr=0.05)
    values = []
    for _ in range(30):
        value = loss(encoder(inputs), labels)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0]
    accuracy = (loss.logits(encoder(inputs)).argmax(1) == labels).float().mean()
    assert accuracy == 1.0


def test_make_loss_rejects_unknown_kinds_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown loss 'cosface'"):
        make_loss("cosface", 8, 4)
    with pytest.raises(ValueError, match="scale s must be a positive"):
        make_loss("arcface", 8, 4, s=0.0)
    with pytest.raises(ValueError, match="margin m must lie in"):
        make_loss("arcface", 8, 4, m=-0.1)
    with pytest.raises(ValueError, match="margin m must lie in"):
        make_loss("subcenter", 8, 4, m=2.0)
    with pytest.raises(ValueError, match="sub-centres k"):
        make_loss("subcenter", 8, 4, k=0)
    with pytest.raises(ValueError, match="at least 3 classes"):
        make_loss("adacos", 8, 2)
    with pytest.raises(ValueError, match="bad options"):
        make_loss("adacos", 8, 4, s=30.0)


def test_bad_inputs_give_clear_errors():
    loss = ArcFace(8, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss(torch.randn(2, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(torch.tensor([[float("nan")] * 8, [1.0] * 8]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \[batch, 8\]"):
        loss(torch.randn(2, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(torch.randn(2, 8), torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------------------------
# Sub-cluster AdaCos


def test_subcluster_adacos_pools_the_probabilities_of_a_class_sub_clusters():
    torch.manual_seed(0)
    loss = SubClusterAdaCos(8, 5)
    assert loss.k == 16 and loss.weight.shape == (80, 8)
    assert float(loss.s) == pytest.approx(math.sqrt(2) * math.log(5 * 16 - 1))
    emb, labels = _batch()
    logits = loss.logits(emb)
    assert logits.shape == (12, 5) and logits.dtype == torch.float32
    cos = F.normalize(emb) @ F.normalize(loss.weight).T  # [B, C * K], class-major rows
    per_subcluster = torch.softmax(float(loss.s) * cos, dim=1).view(12, 5, 16).sum(dim=2)
    torch.testing.assert_close(torch.softmax(logits, dim=1), per_subcluster, atol=1e-6, rtol=1e-5)
    expected = -torch.log(per_subcluster.gather(1, labels[:, None])).mean()
    loss.eval()  # no scale update: the loss is the cross-entropy of the pooled probabilities
    torch.testing.assert_close(loss(emb, labels), expected, atol=1e-5, rtol=1e-5)


def test_subcluster_adacos_with_one_subcluster_is_adacos():
    torch.manual_seed(0)
    ada = AdaCos(8, 10)
    sub = SubClusterAdaCos(8, 10, k=1, trainable=True)
    sub.load_state_dict(ada.state_dict())
    for seed in (1, 2, 3):  # successive training steps: the same scale updates, the same logits
        emb, labels = _batch(n_classes=10, seed=seed)
        torch.testing.assert_close(sub.logits(emb, labels), ada.logits(emb, labels))
        torch.testing.assert_close(sub.s, ada.s)
        torch.testing.assert_close(sub(emb, labels), ada(emb, labels))
    assert float(sub.s) != pytest.approx(math.sqrt(2) * math.log(9))


def test_subcluster_adacos_scale_follows_its_formula_and_adapts():
    torch.manual_seed(0)
    loss = SubClusterAdaCos(8, 6, k=4)
    s0 = float(loss.s)
    emb, labels = _batch(n=16, n_classes=6, seed=3)
    cos = (F.normalize(emb) @ F.normalize(loss.weight).T).view(16, 6, 4).double()
    others = torch.ones(16, 6, dtype=torch.bool)
    others[torch.arange(16), labels] = False
    b_avg = (torch.exp(s0 * cos) * others[:, :, None]).sum(dim=(1, 2)).mean()
    theta = torch.acos(cos.amax(dim=2)[torch.arange(16), labels])
    theta_med = theta.sort().values[7]  # torch's median: the lower middle value of an even count
    expected = math.log(float(b_avg)) / math.cos(min(math.pi / 4, float(theta_med)))
    loss(emb, labels)
    assert float(loss.s) == pytest.approx(max(1.0, expected), rel=1e-5)
    # Another batch gives another scale; eval mode and calls without labels leave it alone.
    first = float(loss.s)
    loss(*_batch(n=16, n_classes=6, seed=4))
    assert float(loss.s) != pytest.approx(first)
    second = float(loss.s)
    loss.logits(emb)
    loss.eval()
    loss(emb, labels)
    assert float(loss.s) == second
    assert "s" in loss.state_dict() and not loss.s.requires_grad


def test_subcluster_adacos_scale_update_cannot_overflow():
    torch.manual_seed(0)
    loss = SubClusterAdaCos(8, 4, k=4)
    loss.s.fill_(500.0)  # exp(500 * cos) overflows float32: the update works in log space
    emb, labels = _batch(n_classes=4)
    value = loss(emb, labels)
    assert torch.isfinite(loss.s) and torch.isfinite(value)


@pytest.mark.parametrize("trainable", [False, True], ids=["fixed", "trainable"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["theta=0", "theta=pi"])
def test_subcluster_adacos_gradients_flow_and_stay_finite(trainable, sign):
    torch.manual_seed(0)
    loss = SubClusterAdaCos(8, 4, k=3, trainable=trainable)
    centres = loss.weight.detach().clone()
    centres.view(4, 3, 8)[:, 0, :] = torch.eye(8)[:4]  # sub-cluster 0 of class c on basis vector c
    with torch.no_grad():
        loss.weight.copy_(centres)
    emb = (sign * 3.0 * torch.eye(8)[:2]).requires_grad_(True)
    value = loss(emb, torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    if trainable:
        assert any(p is loss.weight for p in loss.parameters())
        assert torch.isfinite(loss.weight.grad).all() and loss.weight.grad.abs().sum() > 0
    else:  # the published default: fixed centres, a buffer saved with the state dict
        assert not list(loss.parameters()) and "weight" in loss.state_dict()


def test_subcluster_adacos_under_autocast_keeps_float32_cosines():
    torch.manual_seed(0)
    encoder, loss = torch.nn.Linear(8, 8), SubClusterAdaCos(8, 4, k=4)
    inputs, labels = _batch(n=6, n_classes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = encoder(inputs)
        assert loss.subcosine(emb).dtype == torch.float32
        value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(encoder.weight.grad).all()


def test_subcluster_adacos_rejects_wrong_labels_and_settings():
    loss = SubClusterAdaCos(8, 4, k=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss(torch.randn(2, 8), torch.tensor([0, 11]))  # a sub-cluster index is not a class
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss(torch.randn(2, 8), torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels of shape \[2\]"):
        loss(torch.randn(2, 8), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(torch.tensor([[float("inf")] * 8, [1.0] * 8]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \[batch, 8\]"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least 3 sub-clusters in all"):
        make_loss("subcluster_adacos", 8, 2, k=1)
    with pytest.raises(ValueError, match="sub-centres k"):
        make_loss("subcluster_adacos", 8, 4, k=0)
    with pytest.raises(ValueError, match="bad options"):
        make_loss("subcluster_adacos", 8, 4, m=0.3)
    assert isinstance(make_loss("subcluster_adacos", 8, 2, k=2), SubClusterAdaCos)


@pytest.mark.parametrize("trainable", [False, True], ids=["fixed", "trainable"])
def test_subcluster_adacos_learns_separable_toy_data(trainable):
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat_interleave(16)
    inputs = centres[labels] + 0.3 * torch.randn(64, 16)
    encoder = torch.nn.Linear(16, 8)
    loss = make_loss("subcluster_adacos", 8, 4, k=16, trainable=trainable)
    optimiser = torch.optim.Adam([*encoder.parameters(), *loss.parameters()], lr=0.05)
    values = []
    for _ in range(30):
        value = loss(encoder(inputs), labels)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0]
    accuracy = (loss.logits(encoder(inputs)).argmax(1) == labels).float().mean()
    assert accuracy == 1.0


@pytest.mark.parametrize("kind", ["adacos", "subcluster_adacos"])
def test_an_adaptive_scale_loss_takes_two_calls_in_one_graph(kind):
    """Mixup calls the loss twice (labels and the partner's) before one backward: the second call's
    scale update must not break the first call's graph."""
    loss = make_loss(kind, 8, 4, **({"k": 3} if kind == "subcluster_adacos" else {})).train()
    emb = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    total = 0.5 * loss(emb, labels) + 0.5 * loss(emb, labels.flip(0))
    total.backward()
    assert torch.isfinite(emb.grad).all()
