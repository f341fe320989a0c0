"""Anomaly scores from embeddings: KNN and Mahalanobis backends, domain references, channel policies.

A clip is anomalous when its embedding lies far from the embeddings of the normal training clips of
the same dataset, machine, section and channel (near and far are never mixed). Two distances:

* ``knn``: cosine distance to the ``k`` nearest normal training embeddings (mean over the k).
* ``mahalanobis``: distance to the mean of the normal training embeddings under their covariance.
  With about 1,000 clips against hundreds of dimensions the empirical covariance is singular, so it
  is shrunk towards a scaled identity, ``C = (1 - delta) * S + delta * trace(S) / D * I`` (``S`` the
  maximum-likelihood covariance), with ``delta`` from Ledoit-Wolf or fixed.

Target-domain handling (only 10 target training clips per section): one pooled reference set, or
separate source and target references scored apart with the smaller distance taken; optional
SMOTE-style oversampling of the target references (points interpolated between random pairs of
target clips); and optional distance normalisation (``NORMALISATIONS``), because 10 target clips lie
further from each other than 100 source clips do, so raw target distances are larger for normal
clips too:

* ``"domain_mean"`` / ``"domain_zscore"`` (with separate references): each domain's distances are
  divided by the mean of that domain's leave-one-out training distances (or standardised by their
  mean and standard deviation) before the smaller is taken, so the two domains compete on one scale;
* ``"local_density"`` (KNN): the distance to each reference is divided by that reference's own mean
  distance to its ``density_k`` nearest other references, the K-NN local-density scaling of
  Wilkinghoff et al. (2025, arXiv 2509.10951): a reference in a sparse region (a target clip) is
  reached at a larger distance for the same score. It needs no domain labels.

Training clips are scored too (for score normalisation and decision thresholds), leave-one-out: a
training clip is never its own reference. Every function here works on whole matrices; the only
Python loops run over (machine, section, channel) groups and over row chunks of a distance matrix.

Scores are a DataFrame with columns ``SCORE_COLUMNS``; larger = more anomalous.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
from tqdm.auto import tqdm

from kit import data
from kit.files import atomic_path

SCORE_COLUMNS = ["dataset", "machine", "section", "split", "file_name", "domain", "label", "channel", "score"]
GROUP_COLUMNS = ["dataset", "machine", "section"]
CLIP_KEY = ["dataset", "machine", "section", "split", "file_name"]
BACKENDS = ("knn", "mahalanobis")
NORMALISATIONS = (None, "domain_mean", "domain_zscore", "local_density")

# Policies over the microphones; any embedded channel (a canceller such as "w1") is a policy of its own.
CHANNEL_POLICIES = ("near", "far", "mean", "zmean", "residual", "auto")
SINGLE_CHANNEL = ("near", "far")

# Rows of the test matrix handled per distance block: bounds memory at CHUNK x R floats.
_CHUNK_ROWS = 2048


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _as_matrix(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"{name} holds NaN or infinite values (first at row {row})")
    return x


def _check_same_dims(test: np.ndarray, ref: np.ndarray) -> None:
    if test.shape[1] != ref.shape[1]:
        raise ValueError(f"test embeddings have {test.shape[1]} dims but references have {ref.shape[1]}")


def _unit_rows(name: str, x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); a zero row has no direction, hence no cosine."""
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{name} row {row} is all zeros: the cosine distance is undefined for it")
    return x / norms


# --------------------------------------------------------------------------------------------------
# KNN
# --------------------------------------------------------------------------------------------------
def _knn_from_unit(
    test_unit: np.ndarray,
    ref_unit: np.ndarray,
    k: int,
    test_self: np.ndarray | None = None,
    ref_origin: np.ndarray | None = None,
    ref_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Mean cosine distance to the k nearest references, computed in row chunks.

    ``test_self[i]`` (or -1) names the clip test row i is; ``ref_origin[j]`` names the one or two
    clips reference j was made from (a real clip: itself twice; a SMOTE point: its two parents).
    References made from the test row's own clip are excluded (leave-one-out). ``ref_scale[j]``
    (> 0) divides every distance to reference j before the nearest are chosen (local density).
    """
    out = np.empty(len(test_unit), dtype=np.float64)
    for start in range(0, len(test_unit), _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        dist = 1.0 - test_unit[start:stop] @ ref_unit.T
        if ref_scale is not None:
            # Clip round-off first, so a scaled distance is never negative.
            dist = np.maximum(dist, 0.0) / ref_scale[None, :]
        if test_self is not None:
            own = test_self[start:stop, None]
            dist[(ref_origin[None, :, 0] == own) | (ref_origin[None, :, 1] == own)] = np.inf
        if k == 1:
            nearest = dist.min(axis=1, keepdims=True)
        else:
            nearest = np.partition(dist, k - 1, axis=1)[:, :k]
        # Clip float32 round-off (1 - cos can dip just below 0 for identical directions).
        out[start:stop] = np.maximum(nearest, 0.0).mean(axis=1)
    return out


def knn_distance(test, ref, k: int = 1) -> np.ndarray:
    """Mean cosine distance ``1 - cos`` from each test row to its ``k`` nearest reference rows.

    ``test`` [M, D], ``ref`` [R, D]; returns [M] float64. Invariant to the scale of every row.
    """
    test = _as_matrix("test", test)
    ref = _as_matrix("ref", ref)
    _check_same_dims(test, ref)
    _check_k(k, len(ref))
    return _knn_from_unit(_unit_rows("test", test), _unit_rows("ref", ref), k)


def _check_k(k, n_ref: int, what: str = "reference set") -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n_ref:
        raise ValueError(f"k={k} exceeds the {n_ref} clips available in the {what}")


# --------------------------------------------------------------------------------------------------
# Mahalanobis with a shrinkage covariance
# --------------------------------------------------------------------------------------------------
class _ShrunkGaussian:
    """Mean and shrinkage covariance of a reference set, with a Cholesky factor for distances.

    ``cov = (1 - delta) * S + delta * tau * I`` with ``S`` the maximum-likelihood covariance and
    ``tau = trace(S) / D`` (sklearn's ``LedoitWolf`` / ``ShrunkCovariance`` definition).
    """

    def __init__(self, ref: np.ndarray, shrinkage: str | float):
        ref = ref.astype(np.float64)
        n, dims = ref.shape
        if n < 2:
            raise ValueError(f"a Mahalanobis reference needs at least 2 clips, got {n}")
        self.n = n
        self.mean = ref.mean(axis=0)
        centred = ref - self.mean
        empirical = centred.T @ centred / n
        tau = float(np.trace(empirical)) / dims
        self.delta = _shrinkage_intensity(centred, empirical, tau, shrinkage)
        cov = (1.0 - self.delta) * empirical
        cov[np.diag_indices(dims)] += self.delta * tau
        self.chol = _cholesky(cov)

    def squared_distance(self, test: np.ndarray) -> np.ndarray:
        """``(x - mean)^T cov^-1 (x - mean)`` for each test row, by one triangular solve."""
        diff = (test.astype(np.float64) - self.mean).T
        whitened = scipy.linalg.solve_triangular(self.chol, diff, lower=True, check_finite=False)
        return np.einsum("ij,ij->j", whitened, whitened)

    def leave_one_out(self, squared_distance: np.ndarray) -> np.ndarray:
        """Squared distance of reference clips to the Gaussian refitted without each, from their
        in-set squared distances ``q``.

        Without x_j the mean moves to ``mean - d / (n - 1)`` (``d = x_j - mean``) and the empirical
        covariance to ``alpha S - n / (n - 1)^2 d d^T`` (``alpha = n / (n - 1)``). Keeping the full set's
        intensity ``delta`` and its target rescaled like the covariance (``alpha tau``; the exact
        trace of the smaller set differs by O(1/n)), the left-out covariance is ``alpha cov - beta d d^T``
        with ``beta = (1 - delta) n / (n - 1)^2``, and Sherman-Morrison gives the exact distance
        ``alpha q / (1 - beta q / alpha)``: leave-one-out at no extra cost.
        """
        n = self.n
        alpha = n / (n - 1)
        beta = (1.0 - self.delta) * n / (n - 1) ** 2
        # 1 - beta q / alpha > 0 whenever the left-out covariance is positive definite; guard round-off.
        return (
            alpha * squared_distance / np.maximum(1.0 - beta * squared_distance / alpha, np.finfo(float).eps)
        )


def _shrinkage_intensity(
    centred: np.ndarray, empirical: np.ndarray, tau: float, shrinkage: str | float
) -> float:
    """The fixed intensity, or Ledoit-Wolf's (sklearn's formula, from S and the row norms in O(N D))."""
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit_wolf":
            raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
        n, dims = centred.shape
        frobenius = float(np.sum(empirical**2))
        # Sum over clips of ||x x^T - S||_F^2 = sum ||x||^4 - n ||S||_F^2: no second D x D product needed.
        spread = (float(np.sum(np.sum(centred**2, axis=1) ** 2)) / n - frobenius) / (dims * n)
        distance_to_target = (frobenius - dims * tau**2) / dims  # ||S - tau I||_F^2 / D
        spread = min(spread, distance_to_target)
        return 0.0 if spread == 0 else spread / distance_to_target
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float, np.floating)):
        raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    return float(shrinkage)


def _cholesky(cov: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as err:
        raise ValueError(
            "the reference covariance is singular (fewer clips than dimensions without shrinkage?): "
            "use shrinkage='ledoit_wolf' or a shrinkage above 0"
        ) from err


def mahalanobis_distance(test, ref, shrinkage: str | float = "ledoit_wolf") -> np.ndarray:
    """Mahalanobis distance of each test row [M, D] to the Gaussian of ``ref`` [R, D]; returns [M].

    The covariance is the shrinkage estimate described in the module docstring: ``"ledoit_wolf"``
    picks the intensity from the data, a float in [0, 1] fixes it (0 = plain empirical covariance).
    Distances come from a Cholesky factor and a triangular solve over all rows at once.
    """
    test = _as_matrix("test", test)
    ref = _as_matrix("ref", ref)
    _check_same_dims(test, ref)
    return np.sqrt(_ShrunkGaussian(ref, shrinkage).squared_distance(test))


# --------------------------------------------------------------------------------------------------
# SMOTE-style oversampling
# --------------------------------------------------------------------------------------------------
def smote_oversample(points, n_new: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_new`` synthetic points, each on the segment between a random pair of distinct ``points``.

    Returns ``(synthetic [n_new, D], parents [n_new, 2])`` where ``parents`` are row indices into
    ``points``; the same seed gives the same points.
    """
    points = _as_matrix("points", points)
    if not isinstance(n_new, (int, np.integer)) or n_new < 0:
        raise ValueError(f"the number of SMOTE points must be a non-negative integer, got {n_new!r}")
    if n_new and len(points) < 2:
        raise ValueError(f"SMOTE needs at least 2 points to interpolate between, got {len(points)}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(points), n_new)
    # Draw the partner from the other n - 1 rows so a pair is never a point with itself.
    second = rng.integers(0, len(points) - 1, n_new) if n_new else np.zeros(0, dtype=np.int64)
    second = second + (second >= first)
    position = rng.random((n_new, 1))
    synthetic = points[first] + position * (points[second] - points[first])
    return synthetic.astype(points.dtype, copy=False), np.stack([first, second], axis=1)


# --------------------------------------------------------------------------------------------------
# One group: references, domains, leave-one-out
# --------------------------------------------------------------------------------------------------
def score_group(
    test_emb,
    train_emb,
    train_domain,
    backend: str = "knn",
    k: int = 1,
    separate_domains: bool = False,
    smote: int = 0,
    *,
    shrinkage: str | float = "ledoit_wolf",
    seed: int = 0,
    loo_index=None,
    normalisation: str | None = None,
    density_k: int = 1,
) -> np.ndarray:
    """Score ``test_emb`` [M, D] against the normal training embeddings ``train_emb`` [R, D] of one group.

    * ``separate_domains=False``: one reference set of all training clips. ``True``: source and
      target references (``train_domain`` "source" / "target") are scored apart and the smaller
      distance is kept, so a clip close to either domain's normal data scores low.
    * ``smote``: that many synthetic target references (``smote_oversample`` of the target clips,
      seeded by ``seed``) join the target (or pooled) references. KNN only: interpolated points add
      no direction to a covariance.
    * ``loo_index[i]``: the row of ``train_emb`` that test row i is, same clip and same embedding (-1
      when it is not a reference); that clip, and SMOTE points made from it, are left out of test
      row i's references.
    * ``shrinkage``: the Mahalanobis covariance shrinkage (see ``mahalanobis_distance``).
    * ``normalisation`` (``NORMALISATIONS``, see the module docstring): None keeps the raw distances.
      ``"domain_mean"`` divides each reference set's distances by the mean of its members'
      leave-one-out distances to it (same backend, k and SMOTE points), ``"domain_zscore"``
      subtracts that mean and divides by the standard deviation; both need ``separate_domains``
      (with one pooled set they change no ranking). ``"local_density"`` (KNN, no SMOTE) divides the
      distance to reference j by the mean distance from j to its ``density_k`` nearest other
      references of the same set; a left-out training clip keeps its place in the other
      references' densities (a 1/R effect).

    Returns [M] float64 scores, larger = more anomalous.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    test_emb = _as_matrix("test_emb", test_emb)
    train_emb = _as_matrix("train_emb", train_emb)
    _check_same_dims(test_emb, train_emb)
    train_domain = np.asarray(train_domain, dtype=object)
    if len(train_domain) != len(train_emb):
        raise ValueError(
            f"train_domain has {len(train_domain)} entries for {len(train_emb)} training embeddings"
        )
    _check_smote(smote, backend, train_domain)
    _check_normalisation(normalisation, backend, separate_domains, smote, density_k)
    loo = _check_loo_index(loo_index, len(test_emb), len(train_emb))
    reference_sets = _reference_sets(train_domain, separate_domains)
    target_rows = np.flatnonzero(train_domain == "target")

    scores = np.full(len(test_emb), np.inf)
    for rows in reference_sets:
        # SMOTE points join whichever reference set holds the target clips.
        n_smote = smote if smote > 0 and np.isin(target_rows, rows).all() else 0
        if backend == "knn":
            density = density_k if normalisation == "local_density" else 0
            reference = (train_emb, rows, target_rows, k, n_smote, seed)
            distance = _knn_reference_set(test_emb, *reference, loo, density)
        else:
            distance = _mahalanobis_reference_set(test_emb, train_emb, rows, shrinkage, loo)
        if normalisation in ("domain_mean", "domain_zscore"):
            # The set's own clips, each left out of the set: how far a normal clip of this domain lies.
            if backend == "knn":
                own = _knn_reference_set(train_emb[rows], *reference, rows)
            else:
                own = _mahalanobis_reference_set(train_emb[rows], train_emb, rows, shrinkage, rows)
            distance = _standardise_by_own(distance, own, normalisation, train_domain[rows[0]])
        scores = np.minimum(scores, distance)
    if not np.isfinite(scores).all():
        raise ValueError(f"k={k} leaves some clips without {k} references once their own clip is left out")
    return scores


def _check_smote(smote, backend: str, train_domain: np.ndarray) -> None:
    if not isinstance(smote, (int, np.integer)) or smote < 0:
        raise ValueError(f"smote must be a non-negative integer, got {smote!r}")
    if smote and backend != "knn":
        raise ValueError("smote oversampling applies to the knn backend only")
    n_target = int((train_domain == "target").sum())
    if smote and n_target < 2:
        raise ValueError(f"smote needs at least 2 target training clips, the group has {n_target}")


def _reference_sets(train_domain: np.ndarray, separate_domains: bool) -> list[np.ndarray]:
    """The training rows of each reference set: all of them, or the source and the target clips."""
    if not separate_domains:
        return [np.arange(len(train_domain))]
    unknown = sorted(set(train_domain) - {"source", "target"})
    if unknown:
        raise ValueError(f"separate_domains needs training domains 'source'/'target', found {unknown}")
    sets = [np.flatnonzero(train_domain == "source"), np.flatnonzero(train_domain == "target")]
    for name, rows in zip(("source", "target"), sets):
        if len(rows) == 0:
            raise ValueError(f"separate_domains=True but the group has no {name} training clips")
    return sets


def _check_loo_index(loo_index, n_test: int, n_train: int) -> np.ndarray | None:
    if loo_index is None:
        return None
    loo = np.asarray(loo_index)
    if loo.shape != (n_test,) or not np.issubdtype(loo.dtype, np.integer):
        raise ValueError(
            f"loo_index must be an integer array of shape ({n_test},), got {loo.dtype} {loo.shape}"
        )
    if ((loo < -1) | (loo >= n_train)).any():
        raise ValueError(
            f"loo_index values must be -1 or a training row in [0, {n_train}), got {loo.min()}..{loo.max()}"
        )
    return loo


def _check_normalisation(normalisation, backend: str, separate_domains: bool, smote: int, density_k) -> None:
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if normalisation in ("domain_mean", "domain_zscore") and not separate_domains:
        raise ValueError(
            f"normalisation={normalisation!r} puts separate source and target references on one scale: "
            "it needs separate_domains=True (on one pooled set it would change no ranking)"
        )
    if normalisation == "local_density":
        if backend != "knn":
            raise ValueError("normalisation='local_density' scales KNN distances: it needs backend='knn'")
        if smote:
            raise ValueError(
                "normalisation='local_density' and smote both re-weight the target domain; use one"
            )
        if isinstance(density_k, bool) or not isinstance(density_k, (int, np.integer)) or density_k < 1:
            raise ValueError(f"density_k must be a positive integer, got {density_k!r}")


def _standardise_by_own(distance: np.ndarray, own: np.ndarray, normalisation: str, domain: str) -> np.ndarray:
    """``distance`` on the scale of the reference set's leave-one-out distances ``own``."""
    mean = float(own.mean())
    if normalisation == "domain_mean":
        if not mean > 0:
            raise DegenerateScoresError(
                f"the {domain} references all coincide (mean leave-one-out distance {mean}): "
                "cannot normalise by it"
            )
        return distance / mean
    std = float(own.std())
    if not std > 0:
        raise DegenerateScoresError(
            f"the {domain} references' leave-one-out distances are constant ({len(own)} clips): "
            "cannot standardise by them (use normalisation='domain_mean')"
        )
    return (distance - mean) / std


def _knn_reference_set(
    test_emb, train_emb, rows, target_rows, k, n_smote, seed, loo, density_k: int = 0
) -> np.ndarray:
    refs = train_emb[rows]
    origin = np.stack([rows, rows], axis=1)
    if n_smote:
        synthetic, parents = smote_oversample(train_emb[target_rows], n_smote, seed=seed)
        refs = np.concatenate([refs, synthetic])
        origin = np.concatenate([origin, target_rows[parents]])
    # A left-out clip loses itself, so the set must hold k others.
    left_out = 1 if loo is not None and np.isin(loo, rows).any() else 0
    _check_k(k, len(rows) + n_smote - left_out, f"reference set of {len(rows)} clips (+{n_smote} SMOTE)")
    ref_unit = _unit_rows("train_emb", refs)
    scale = None
    if density_k:
        _check_k(density_k, len(rows) - 1, f"reference set of {len(rows)} clips (density_k, itself left out)")
        # Each reference's mean distance to its density_k nearest other references (itself left out).
        scale = _knn_from_unit(ref_unit, ref_unit, density_k, rows, origin)
        if not (scale > 0).all():
            raise DegenerateScoresError(
                f"{int((scale <= 0).sum())} references have {density_k} identical neighbours "
                "(collapsed embeddings?): their local density is undefined"
            )
    return _knn_from_unit(_unit_rows("test_emb", test_emb), ref_unit, k, loo, origin, scale)


def _mahalanobis_reference_set(test_emb, train_emb, rows, shrinkage, loo) -> np.ndarray:
    gaussian = _ShrunkGaussian(train_emb[rows], shrinkage)
    squared = gaussian.squared_distance(test_emb)
    if loo is not None:
        # Test rows that are clips of this reference set (loo_index says test row i is that clip).
        in_set = np.zeros(len(train_emb), dtype=bool)
        in_set[rows] = True
        member = (loo >= 0) & in_set[np.maximum(loo, 0)]
        squared[member] = gaussian.leave_one_out(squared[member])
    return np.sqrt(squared)


# --------------------------------------------------------------------------------------------------
# Whole embedding sets: groups and channel policies
# --------------------------------------------------------------------------------------------------
_ITEM_COLUMNS = ["dataset", "machine", "section", "split", "file_name", "domain", "label", "channel"]


def _check_items(items: pd.DataFrame, emb: np.ndarray) -> None:
    missing = [c for c in _ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(f"embedding items lack columns {missing}; it needs {_ITEM_COLUMNS}")
    if len(items) != len(emb):
        raise ValueError(f"embedding items have {len(items)} rows but the embedding matrix has {len(emb)}")
    channels = sorted(set(items["channel"]) - set(data.channel_names()))
    if channels:
        raise ValueError(f"embedding items: channel must be one of {data.channel_names()}, found {channels}")
    duplicated = items.duplicated(CLIP_KEY + ["channel"])
    if duplicated.any():
        row = items.loc[duplicated, CLIP_KEY + ["channel"]].iloc[0].tolist()
        raise ValueError(f"embedding items hold clip {row} more than once")


def _score_channel(
    clips: pd.DataFrame, emb: np.ndarray, options: dict, include_train: bool = True
) -> np.ndarray:
    """Scores of the clips of one group and channel; normal training clips are the references.

    With ``include_train=False`` training clips are not scored (NaN), which halves the work.
    """
    is_reference = ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()
    reference_rows = np.flatnonzero(is_reference)
    if len(reference_rows) == 0:
        group = clips[GROUP_COLUMNS].iloc[0].tolist()
        raise ValueError(f"group {group} has no normal training clips to use as references")
    loo = np.full(len(clips), -1)
    loo[reference_rows] = np.arange(len(reference_rows))
    scored = np.ones(len(clips), dtype=bool) if include_train else (clips["split"] != "train").to_numpy()
    scores = np.full(len(clips), np.nan)
    scores[scored] = score_group(
        emb[scored],
        emb[reference_rows],
        clips["domain"].to_numpy()[reference_rows],
        loo_index=loo[scored],
        **options,
    )
    return scores


class DegenerateScoresError(ValueError):
    """A group's training scores are all equal (e.g. embeddings collapsed onto a few points), so they
    cannot standardise anything."""


def _standardise_on_train(clips: pd.DataFrame, scores: np.ndarray) -> np.ndarray:
    reference = ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()
    std = scores[reference].std()
    if not std > 0:
        group = clips[GROUP_COLUMNS].iloc[0].tolist()
        raise DegenerateScoresError(
            f"group {group}: training scores are constant (collapsed embeddings?), cannot standardise them"
        )
    return (scores - scores[reference].mean()) / std


def _paired_channels(group: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each clip's near and far rows, in near-row order."""
    near = group[group["channel"] == "near"]
    far = group[group["channel"] == "far"]
    paired = near.reset_index().merge(
        far[CLIP_KEY].reset_index(), on=CLIP_KEY, how="outer", suffixes=("_near", "_far"), indicator=True
    )
    unpaired = paired[paired["_merge"] != "both"]
    if len(unpaired):
        first = unpaired.iloc[0]
        side = "far" if first["_merge"] == "left_only" else "near"
        raise ValueError(
            f"clip {first[CLIP_KEY].tolist()} has no {side} embedding: this channel policy needs near and far "
            f"for every clip ({len(unpaired)} clips unpaired)"
        )
    paired = paired.sort_values(
        "index_near", kind="stable"
    )  # an outer merge sorts by key; keep the items' order
    return paired["index_near"].to_numpy(dtype=int), paired["index_far"].to_numpy(dtype=int)


def score_embeddings(
    items: pd.DataFrame,
    emb,
    *,
    backend: str = "knn",
    k: int = 1,
    separate_domains: bool = False,
    smote: int = 0,
    channel_policy: str = "near",
    include_train: bool = True,
    shrinkage: str | float = "ledoit_wolf",
    seed: int = 0,
    normalisation: str | None = None,
    density_k: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every clip of ``(items, emb)`` per (dataset, machine, section) group.

    References are the group's normal training clips of the same channel; training clips are scored
    leave-one-out. ``backend``, ``k``, ``separate_domains``, ``smote``, ``shrinkage``, ``seed``,
    ``normalisation`` and ``density_k`` are those of ``score_group``. ``channel_policy`` decides what one clip's score is made of (the output
    ``channel`` column names the policy):

    * ``"near"``: the near-channel embedding against near references (the submitted channel).
    * ``"far"``: the far-channel embedding against far references.
    * ``"mean"``: near and far scored apart and their raw scores averaged per clip (the EAT-ASP
      report's score-level fusion of the two channels' 1-NN scores).
    * ``"zmean"``: near and far scored apart, each standardised with the mean and standard
      deviation of its own training-clip (leave-one-out) scores, then averaged per clip (the two
      channels' distances can live on different scales; this puts them on one).
    * ``"residual"``: the noise-aware policy. The far microphone hears the environment about as the
      near one does but the machine less, so ``near_emb - far_emb`` cancels what both share (noise)
      and keeps the machine part; the residual is rescaled to unit length and scored as its own
      channel (references: the residuals of the normal training clips).

    Returns a scores DataFrame (``SCORE_COLUMNS``), one row per clip, training clips included when
    ``include_train``.
    """
    if channel_policy not in CHANNEL_POLICIES + data.channel_names():
        raise ValueError(
            f"channel_policy must be one of {CHANNEL_POLICIES} or an embedded channel "
            f"({', '.join(data.channel_names())}), got {channel_policy!r}"
        )
    emb = _as_matrix("emb", emb)
    _check_items(items, emb)
    items = items.reset_index(drop=True)
    candidates = ["near"] + [c for c in dict.fromkeys(items["channel"]) if c not in ("near", "far")]
    options = dict(
        backend=backend,
        k=k,
        separate_domains=separate_domains,
        smote=smote,
        shrinkage=shrinkage,
        seed=seed,
        normalisation=normalisation,
        density_k=density_k,
    )

    parts = []
    groups = items.groupby(GROUP_COLUMNS, sort=False)
    for _, group in tqdm(
        groups, total=groups.ngroups, desc=f"score {backend}/{channel_policy}", disable=not progress
    ):
        label = channel_policy
        if channel_policy not in ("mean", "zmean", "residual"):
            channel = channel_policy
            if channel_policy == "auto":
                channel = choose_channel(group, emb, candidates)
                label = f"auto:{channel}"
            clips = group[group["channel"] == channel]
            if clips.empty:
                raise ValueError(f"group {group[GROUP_COLUMNS].iloc[0].tolist()} has no {channel} embeddings")
            scores = _score_channel(clips, emb[clips.index.to_numpy()], options, include_train)
        else:
            near_rows, far_rows = _paired_channels(group)
            clips = items.loc[near_rows]
            if channel_policy == "mean":
                near_scores = _score_channel(clips, emb[near_rows], options, include_train)
                far_scores = _score_channel(clips, emb[far_rows], options, include_train)
                scores = (near_scores + far_scores) / 2.0
            elif channel_policy == "zmean":  # training scores are needed for the standardisation
                near_scores = _standardise_on_train(clips, _score_channel(clips, emb[near_rows], options))
                far_scores = _standardise_on_train(clips, _score_channel(clips, emb[far_rows], options))
                scores = (near_scores + far_scores) / 2.0
            else:
                residual = emb[near_rows].astype(np.float32) - emb[far_rows].astype(np.float32)
                residual = _unit_rows("near - far residual", residual)
                scores = _score_channel(clips, residual, options, include_train)
        part = clips[_ITEM_COLUMNS].assign(channel=label, score=scores)
        parts.append(part if include_train else part[part["split"] != "train"])
    if not parts:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[SCORE_COLUMNS]


def channel_separability(clips: pd.DataFrame, emb: np.ndarray) -> float:
    """How well a channel's embeddings of the normal training clips tell their conditions apart:
    the balanced leave-one-out 1-NN (cosine) accuracy of predicting each clip's attributes + domain
    from the others. Noise that masks the machine, or a canceller that removes machine sound, blurs
    these conditions; no test clip and no anomaly label is used."""
    train = ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()
    labels = (clips["attributes"].astype(str) + "|" + clips["domain"].astype(str)).to_numpy()[train]
    if len(set(labels)) < 2 or len(labels) < 3:
        return 0.0
    unit = _unit_rows("embeddings", emb[train])
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    predicted = labels[similarity.argmax(axis=1)]
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def choose_channel(group: pd.DataFrame, emb: np.ndarray, candidates) -> str:
    """The ``auto`` policy's label-free rule for one (dataset, machine, section) group: among the near
    channel and the cancellers embedded for it, the one whose normal training clips are most
    separable by their conditions (``channel_separability``); a tie keeps the earlier (near first)."""
    if len(candidates) == 1:
        return candidates[0]
    best, best_value = "near", -1.0
    for channel in candidates:
        clips = group[group["channel"] == channel]
        if clips.empty:
            continue
        value = channel_separability(clips, emb[clips.index.to_numpy()])
        if value > best_value + 1e-9:
            best, best_value = channel, value
    return best


def auto_choices(systems: dict[str, pd.DataFrame]) -> dict[str, dict[str, str]]:
    """The channel the ``auto`` policy chose per machine, for every auto system:
    ``{"logmel-knn-auto": {"SynFan": "wl", ...}}`` (from the ``auto:<channel>`` score labels)."""
    choices = {}
    for name, scores in systems.items():
        chosen = scores[scores["channel"].astype(str).str.startswith("auto:")]
        if len(chosen):
            pairs = chosen.drop_duplicates("machine")[["machine", "channel"]].itertuples(index=False)
            choices[name] = {machine: channel.split(":", 1)[1] for machine, channel in pairs}
    return choices


def _policy_applies(policy: str, channels: set) -> bool:
    """Whether a branch embedded on ``channels`` can be scored with ``policy``."""
    if policy in ("far", "mean", "zmean", "residual"):
        return "far" in channels
    if policy == "auto":  # near or a canceller: on mono data (or without cancellers) the near channel
        return "near" in channels
    return policy in channels


def _for_backend(options: dict, backend: str) -> dict:
    """Options for one backend: a value given as ``{backend: value}`` is that backend's own (e.g.
    ``smote={"knn": 100}``, ``normalisation={"knn": "local_density", "mahalanobis": "domain_mean"}``)."""
    chosen = {}
    for key, value in options.items():
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(BACKENDS))
            if unknown:
                raise ValueError(f"{key}: per-backend values must be keyed by {BACKENDS}, got {unknown}")
            if backend in value:
                chosen[key] = value[backend]
        else:
            chosen[key] = value
    return chosen


def score_branches(
    embeddings: dict[str, tuple[pd.DataFrame, np.ndarray]],
    backends=BACKENDS,
    channel_policies=CHANNEL_POLICIES,
    **options,
) -> dict[str, pd.DataFrame]:
    """Every (branch, backend, channel policy) combination: ``{"<branch>-<backend>-<policy>": scores}``.

    ``embeddings`` maps a branch name to its ``(items, emb)``; ``options`` go to ``score_embeddings``
    (a value given as ``{backend: value}`` applies to that backend only). Policies over channels a
    branch has not embedded (far, a canceller) are skipped; ``auto`` is there whenever near is (it
    is the near channel where no canceller was embedded, so a fusion list naming it runs on any data). A
    combination whose training scores are degenerate (``DegenerateScoresError``) is left out with a
    warning naming it, so one collapsed branch does not stop the others from being scored."""
    systems = {}
    for branch, (items, emb) in embeddings.items():
        present = set(items["channel"])
        for backend in backends:
            for policy in channel_policies:
                if not _policy_applies(policy, present):
                    continue
                name = f"{branch}-{backend}-{policy}"
                try:
                    systems[name] = score_embeddings(
                        items, emb, backend=backend, channel_policy=policy, **_for_backend(options, backend)
                    )
                except DegenerateScoresError as err:
                    warnings.warn(f"{name} left out: {err}", stacklevel=2)
    return systems


def save_scores(systems: dict[str, pd.DataFrame], folder) -> list:
    """Write each system's scores to ``<folder>/<system>.csv`` (atomically)."""
    paths = []
    for name, scores in systems.items():
        with atomic_path(Path(folder) / f"{name}.csv") as tmp:
            scores.to_csv(tmp, index=False)
        paths.append(Path(folder) / f"{name}.csv")
    return paths


def select_systems(systems: dict[str, pd.DataFrame], names) -> dict[str, pd.DataFrame]:
    """``{name: systems[name]}`` for ``names`` in order; a name without scores (misspelt, or left out
    by ``score_branches``) raises a KeyError that lists the systems there are."""
    missing = [name for name in names if name not in systems]
    if missing:
        raise KeyError(f"no scores for {missing}; scored systems: {sorted(systems)}")
    return {name: systems[name] for name in names}


def load_scores(folder) -> dict[str, pd.DataFrame]:
    """Read every ``<system>.csv`` of ``folder`` written by ``save_scores``."""
    paths = sorted(Path(folder).glob("*.csv"))
    if not paths:
        raise FileNotFoundError(f"no score files in {folder}: run notebook 09_scoring first")
    systems = {}
    for path in paths:
        frame = pd.read_csv(path, dtype={"section": str, "file_name": str}, keep_default_na=False)
        missing = sorted(set(SCORE_COLUMNS) - set(frame.columns))
        if missing:
            raise ValueError(f"{path} is not a score file: columns {missing} are missing")
        systems[path.stem] = frame
    return systems
