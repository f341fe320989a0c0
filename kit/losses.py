"""Angular-margin classification losses for the proxy task: ArcFace, sub-center ArcFace, AdaCos and
sub-cluster AdaCos.

All of them compare L2-normalised embeddings with L2-normalised class weights, so a logit is a scaled
cosine ``s * cos(theta_j)`` (for sub-cluster AdaCos, the log-sum-exp of a class's scaled sub-cluster
cosines). ArcFace adds an angular margin ``m`` to the angle of the true class,
``s * cos(theta_y + m)``, which pulls each class tighter than plain softmax would; that compactness is
what distance-based anomaly scoring (KNN, Mahalanobis) relies on later.

Each loss is an ``nn.Module`` holding its class weights: ``loss(emb, labels)`` returns the mean
cross-entropy, ``loss.logits(emb, labels=None)`` the logits (with the margin when labels are given,
plain scaled cosines otherwise, e.g. for accuracy).

Numerical care, shared by all of them:

- cosines are computed in float32 even under autocast, and clamped to ``[-1 + eps, 1 - eps]``: the
  margin uses ``sin(theta) = sqrt(1 - cos^2)``, whose gradient is infinite at ``cos = +-1``, i.e. when
  an embedding coincides with (or opposes) a class weight;
- when ``theta + m > pi``, ``cos(theta + m)`` starts to increase again with theta, so a worse
  embedding would get a better logit. As in the reference ArcFace implementation, the true-class
  logit then falls back to ``cos(theta) - m * sin(m)`` (the "th/mm" trick: ``th = cos(pi - m)``,
  ``mm = sin(pi - m) * m``), which keeps decreasing with theta. ``easy_margin=True`` instead applies
  the margin only where ``cos(theta) > 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("arcface", "subcenter", "adacos", "subcluster_adacos")


class _AngularMarginLoss(nn.Module):
    """Class weights ``[n_classes * k, D]`` (k sub-centres per class), cosine logits and the margin.
    Subclasses set the scale ``s``: a fixed float (ArcFace) or a buffer updated per batch (AdaCos)."""

    def __init__(
        self,
        embed_dim: int,
        n_classes: int,
        *,
        k: int = 1,
        m: float = 0.5,
        easy_margin: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if n_classes < 2:
            raise ValueError(f"a classification loss needs at least 2 classes, got n_classes={n_classes}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"the number of sub-centres k must be an integer >= 1, got {k!r}")
        if not (0.0 <= m < math.pi / 2):
            raise ValueError(
                f"the angular margin m must lie in [0, pi/2) radians, got {m} (ASD work uses 0.2 to 0.7)"
            )
        self.embed_dim, self.n_classes, self.k = embed_dim, n_classes, k
        self.m, self.easy_margin, self.eps = float(m), easy_margin, eps
        self.weight = nn.Parameter(torch.empty(n_classes * k, embed_dim))
        nn.init.xavier_uniform_(self.weight)

    def subcosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Clamped cosine between each embedding and each sub-centre ``[B, n_classes, k]`` (float32)."""
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected embeddings of shape [batch, {self.embed_dim}], got {tuple(emb.shape)}"
            )
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        return cos.view(emb.shape[0], self.n_classes, self.k).clamp(-1.0 + self.eps, 1.0 - self.eps)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Clamped cosine between each embedding and each class ``[B, n_classes]`` (max over sub-centres)."""
        return self.subcosine(emb).amax(dim=2)

    def _with_margin(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos`` with the true-class entries replaced by ``cos(theta_y + m)`` (or its fallback)."""
        if self.m == 0.0:
            return cos
        true_cos = cos.gather(1, labels[:, None])
        sin = (1.0 - true_cos.square()).sqrt()
        shifted = true_cos * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
        if self.easy_margin:
            shifted = torch.where(true_cos > 0, shifted, true_cos)
        else:
            threshold = math.cos(math.pi - self.m)  # theta + m > pi beyond this cosine
            shifted = torch.where(
                true_cos > threshold, shifted, true_cos - math.sin(math.pi - self.m) * self.m
            )
        return cos.scatter(1, labels[:, None], shifted)

    def _check(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.shape != (emb.shape[0],):
            raise ValueError(f"expected labels of shape [{emb.shape[0]}], got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        # One host sync for all checks; the slow path only runs to explain a failure.
        bad = (labels < 0).any() | (labels >= self.n_classes).any() | ~torch.isfinite(emb).all()
        if bool(bad):
            if not bool(torch.isfinite(emb).all()):
                raise ValueError("embeddings contain NaN or inf")
            raise ValueError(
                f"labels must lie in [0, {self.n_classes}), "
                f"got values from {int(labels.min())} to {int(labels.max())}"
            )

    def logits(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosine logits ``[B, n_classes]``; with ``labels``, the margin on each true class."""
        cos = self.cosine(emb)
        if labels is None:
            return self.s * cos
        self._check(emb, labels)
        return self.s * self._with_margin(cos, labels)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the margin logits."""
        return F.cross_entropy(self.logits(emb, labels), labels)


class SubCenterArcFace(_AngularMarginLoss):
    """Sub-center ArcFace: ``k`` weight vectors per class and the cosine to a class is the largest over
    them, so a class made of several modes (machines without attribute labels) need not be squeezed
    into one cluster. ``weight`` is ``[n_classes * k, D]``, class ``c`` owning rows ``c*k .. c*k + k-1``."""

    def __init__(
        self,
        embed_dim: int,
        n_classes: int,
        k: int = 3,
        s: float = 30.0,
        m: float = 0.5,
        easy_margin: bool = False,
    ):
        super().__init__(embed_dim, n_classes, k=k, m=m, easy_margin=easy_margin)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"the scale s must be a positive finite number, got {s} (ASD work uses 30 to 64)"
            )
        self.s = float(s)


class ArcFace(SubCenterArcFace):
    """ArcFace (additive angular margin): ``s * cos(theta_y + m)`` for the true class, ``s * cos(theta_j)``
    for the others; one weight vector per class (sub-center ArcFace with ``k = 1``)."""

    def __init__(
        self, embed_dim: int, n_classes: int, s: float = 30.0, m: float = 0.5, easy_margin: bool = False
    ):
        super().__init__(embed_dim, n_classes, k=1, s=s, m=m, easy_margin=easy_margin)


class AdaCos(_AngularMarginLoss):
    """AdaCos (Zhang et al., CVPR 2019): the scale adapts to the batch instead of being tuned.

    It starts at the fixed-AdaCos value ``sqrt(2) * log(C - 1)``; each training forward (train mode)
    then sets, without gradient, ``s = log(B_avg) / cos(min(pi/4, theta_med))`` where ``B_avg`` is the
    batch mean of ``sum_{j != y} exp(s_old * cos(theta_j))`` and ``theta_med`` the median angle to the
    true class. ``s`` is a buffer, so it is saved in the state dict. Two guards beyond the paper: it
    needs at least 3 classes (the initial scale is 0 for 2), and ``s`` is floored at 1 so that a batch
    whose wrong-class cosines are all strongly negative (possible with very few classes) cannot flip
    its sign. An optional ArcFace margin ``m`` applies to the true class (0 = the original AdaCos).
    """

    def __init__(self, embed_dim: int, n_classes: int, m: float = 0.0):
        if n_classes < 3:
            raise ValueError(
                f"AdaCos needs at least 3 classes (its initial scale sqrt(2)*log(C-1) is 0 for C=2), "
                f"got n_classes={n_classes}"
            )
        super().__init__(embed_dim, n_classes, m=m)
        self.register_buffer("s", torch.tensor(math.sqrt(2.0) * math.log(n_classes - 1)))

    @torch.no_grad()
    def _update_scale(self, cos: torch.Tensor, labels: torch.Tensor) -> None:
        is_true = F.one_hot(labels, self.n_classes).bool()
        b_avg = torch.where(is_true, 0.0, torch.exp(self.s * cos)).sum(dim=1).mean()
        theta_med = torch.acos(cos[is_true]).median()
        new_s = torch.log(b_avg) / torch.cos(theta_med.clamp(max=math.pi / 4))
        self.s.copy_(new_s.clamp(min=1.0))

    def logits(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`ArcFace.logits`; in train mode, a call with labels first updates the scale."""
        cos = self.cosine(emb)
        if labels is None:
            return self.s * cos
        self._check(emb, labels)
        if self.training:
            self._update_scale(cos.detach(), labels)
        # a copy of the scale: the graph must not hold the buffer a second call (mixup) updates in place
        return self.s.clone() * self._with_margin(cos, labels)


class SubClusterAdaCos(_AngularMarginLoss):
    """Sub-cluster AdaCos (Wilkinghoff, IJCNN 2021): ``k`` sub-cluster centres per class, a softmax over
    all ``n_classes * k`` scaled sub-cluster cosines, and a class's probability the sum of its
    sub-clusters' probabilities; the scale adapts as in AdaCos. A class made of several modes (pseudo-
    labelled machines, attribute groups) need not collapse onto one centre.

    With ``c[i, j, l]`` the cosine between embedding ``i`` and centre ``l`` of class ``j``:

    - logits (class level, what ``logits`` returns): ``z[i, j] = log sum_l exp(s * c[i, j, l])``, so that
      ``softmax(z)[j] = sum_l softmax(s * c)[j, l]``, the paper's pooled class probability; the loss is
      the cross-entropy of ``z``. No margin (the published loss has none).
    - scale: ``s0 = sqrt(2) * log(n_classes * k - 1)``; each training forward with labels then sets,
      without gradient, ``s = log(B_avg) / cos(min(pi/4, theta_med))`` with
      ``B_avg = mean_i sum_{j != y_i} exp(z_old[i, j]) = mean_i sum_{j != y_i} sum_l exp(s_old * c[i, j, l])``
      (the AdaCos sum over the other classes, of their pooled logits) and ``theta_med`` the batch median
      of the class-level angle to the true class, ``arccos(max_l c[i, y_i, l])`` (its nearest
      sub-cluster, the centre that dominates the pooled logit). ``log(B_avg)`` is computed as a
      log-sum-exp, so a large scale cannot overflow; ``s`` is floored at 1 as in :class:`AdaCos`.
      The published reference code differs in two details: its median angle is the sum of the true
      class's ``k`` sub-cluster angles (for ``k > 1`` nearly always above pi/4, i.e. the cap), and some
      versions include the true class in ``B_avg``. With ``k = 1`` this class is exactly :class:`AdaCos`
      without margin (same logits, same scale updates).
    - centres: fixed after their random (Xavier) initialisation by default, as in the reference
      implementations (Wilkinghoff's and ASDKit's, which kasahart/asd-experiments trains with): a buffer
      ``weight [n_classes * k, D]``, class ``c`` owning rows ``c*k .. c*k + k-1``, saved in the state
      dict. ``trainable=True`` makes them a parameter.
    """

    def __init__(self, embed_dim: int, n_classes: int, k: int = 16, trainable: bool = False):
        if isinstance(k, int) and k >= 1 and n_classes * k < 3:
            raise ValueError(
                "sub-cluster AdaCos needs at least 3 sub-clusters in all (its initial scale "
                f"sqrt(2)*log(n_classes*k-1) is 0 for 2), got n_classes={n_classes}, k={k}"
            )
        super().__init__(embed_dim, n_classes, k=k, m=0.0)
        if not trainable:
            centres = self.weight.detach().clone()
            del self.weight
            self.register_buffer("weight", centres)
        self.trainable = bool(trainable)
        self.register_buffer("s", torch.tensor(math.sqrt(2.0) * math.log(n_classes * k - 1)))

    @torch.no_grad()
    def _update_scale(self, cos: torch.Tensor, labels: torch.Tensor) -> None:
        is_true = F.one_hot(labels, self.n_classes).bool()  # [B, C]
        others = (self.s * cos).masked_fill(is_true[:, :, None], float("-inf"))
        log_b_avg = torch.logsumexp(others.flatten(), dim=0) - math.log(cos.shape[0])
        theta_med = torch.acos(cos.amax(dim=2)[is_true]).median()
        new_s = log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))
        self.s.copy_(new_s.clamp(min=1.0))

    def logits(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``[B, n_classes]``, each the log-sum-exp of its scaled sub-cluster cosines; in
        train mode, a call with labels first updates the scale."""
        cos = self.subcosine(emb)
        if labels is not None:
            self._check(emb, labels)
            if self.training:
                self._update_scale(cos.detach(), labels)
        # a copy of the scale: the graph must not hold the buffer a second call (mixup) updates in place
        return torch.logsumexp(self.s.clone() * cos, dim=2)

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, k={self.k}, trainable={self.trainable}"


def make_loss(kind: str, embed_dim: int, n_classes: int, **options) -> nn.Module:
    """Build loss ``kind`` (one of ``LOSSES``); ``options`` go to its constructor (``s``, ``m``,
    ``easy_margin``, ``k`` for ``"subcenter"``; only ``m`` for ``"adacos"``; ``k`` and ``trainable`` for
    ``"subcluster_adacos"``)."""
    classes = {
        "arcface": ArcFace,
        "subcenter": SubCenterArcFace,
        "adacos": AdaCos,
        "subcluster_adacos": SubClusterAdaCos,
    }
    if kind not in classes:
        raise ValueError(f"unknown loss {kind!r}: expected one of {', '.join(LOSSES)}")
    try:
        return classes[kind](embed_dim, n_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad options {sorted(options)} for loss {kind!r}: {err}") from err
