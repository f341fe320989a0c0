"""Anomaly scores from embeddings: KNN, Mahalanobis and BEAM backends, domain references, channel policies.

A clip is anomalous when its embedding lies far from the embeddings of the normal training clips of
the same dataset, machine, section and channel (near and far are never mixed). Three distances, each
a ``Backend`` in ``REGISTRY`` (a new distance is one class there, nothing else):

* ``knn``: cosine distance to the ``k`` nearest normal training embeddings (mean over the k).
* ``mahalanobis``: distance to the mean of the normal training embeddings under their covariance.
  With about 1,000 clips against hundreds of dimensions the empirical covariance is singular, so it
  is shrunk towards a scaled identity, ``C = (1 - delta) * S + delta * trace(S) / D * I`` (``S`` the
  maximum-likelihood covariance), with ``delta`` from Ledoit-Wolf or fixed.
* ``beam``: BEAM + VarMin on per-band embeddings [N, F, D] (one vector per frequency band, from
  band pooling): per band f the nearest reference is chosen separately, with the distance
  ``0.5 (1 - cos)`` minus ``alpha[f] * b[i, f]``, where ``b[i, f]`` is reference i's mean distance to
  its ``beam_neighbours`` (4) nearest other references and ``alpha[f]`` the variance-minimising
  coefficient fitted leave-one-out on the references; the score is the mean over bands. A normal
  clip whose bands resemble different normal clips (low band like clip A, high band like clip B)
  scores low, which one whole-clip nearest neighbour cannot do; VarMin levels the score of clips
  whose nearest reference lies in a sparse region. As kasahart/asd-experiments (``beam.md``), the
  best public 2026 system's scorer.

Per-band embeddings [N, F, D] also work with ``knn`` and ``mahalanobis``: each clip is flattened to
[F * D]. ``beam`` needs them (clip embeddings [N, D] are refused with a message saying how to get them).

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
Python loops run over (machine, section, channel) groups, over reference sets and over row chunks
of a distance matrix.

Scores are a DataFrame with columns ``SCORE_COLUMNS``; larger = more anomalous.
"""

from __future__ import annotations

import abc
import numbers
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import scipy.linalg
from tqdm.auto import tqdm

from kit import data
from kit.files import atomic_path

SCORE_COLUMNS = ["dataset", "machine", "section", "split", "file_name", "domain", "label", "channel", "score"]
GROUP_COLUMNS = ["dataset", "machine", "section"]
CLIP_KEY = ["dataset", "machine", "section", "split", "file_name"]
NORMALISATIONS = (None, "domain_mean", "domain_zscore", "local_density")
# Normalisations score_group applies from a backend's distances; the others are a backend's own.
_DOMAIN_NORMALISATIONS = ("domain_mean", "domain_zscore")

# Policies over the microphones; any embedded channel (a canceller such as "w1") is a policy of its own.
CHANNEL_POLICIES = ("near", "far", "mean", "zmean", "residual", "orthogonal", "auto")
SINGLE_CHANNEL = ("near", "far")
# Policies made of a clip's near and far embeddings together.
_PAIRED_POLICIES = ("mean", "zmean", "residual", "orthogonal")


def _residual_gain(policy: str) -> float:
    """The far gain A of a policy ``residual@A`` (``residual@0.5``): several gains are scored side by
    side in one run, where plain ``residual`` takes the ``residual_scale`` setting."""
    try:
        return float(policy.split("@", 1)[1])
    except ValueError:
        raise ValueError(
            f"channel policy {policy!r}: expected residual@A with a number A, e.g. residual@0.5"
        ) from None


def _base_policy(policy: str) -> str:
    """``residual@0.5`` -> ``residual``; any other policy as it is."""
    return "residual" if policy.startswith("residual@") else policy


# Rows of the test matrix handled per distance block: bounds memory at CHUNK x R floats.
_CHUNK_ROWS = 2048

_PER_BAND_HINT = (
    "needs per-band embeddings [N, F, D]: extract with pooling band_rdp/band_mean from a backbone "
    "with a time x frequency grid"
)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _as_matrix(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims], got shape {x.shape}")
    return _finite(name, x)


def _as_embeddings(name: str, x) -> np.ndarray:
    """Clip embeddings [N, D] or per-band embeddings [N, F, D]."""
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be clip embeddings [N, D] or per-band embeddings [N, F, D], got shape {x.shape}"
        )
    return _finite(name, x)


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"{name} holds NaN or infinite values (first at row {row})")
    return x


def _per_clip(x: np.ndarray) -> str:
    return f"{x.shape[1]} dims" if x.ndim == 2 else f"{x.shape[1]} bands x {x.shape[2]} dims"


def _check_same_dims(test: np.ndarray, ref: np.ndarray) -> None:
    if test.shape[1:] != ref.shape[1:]:
        raise ValueError(f"test embeddings have {_per_clip(test)} but references have {_per_clip(ref)}")


def _unit_rows(name: str, x: np.ndarray) -> np.ndarray:
    """Vectors scaled to unit L2 norm along the last axis (float32): rows of [N, D], each band of
    [N, F, D]; a zero vector has no direction, hence no cosine."""
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms == 0).any():
        where = np.argwhere(norms[..., 0] == 0)[0]
        band = f" band {int(where[1])}" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} row {int(where[0])}{band} is all zeros: the cosine distance is undefined for it"
        )
    return x / norms


class DegenerateScoresError(ValueError):
    """A group's training scores are all equal (e.g. embeddings collapsed onto a few points), so they
    cannot standardise anything."""


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
    euclidean: bool = False,
) -> np.ndarray:
    """Mean cosine distance to the k nearest references, computed in row chunks (``euclidean``: the
    mean squared Euclidean distance per dimension instead, of rows as they are).

    ``test_self[i]`` (or -1) names the clip test row i is; ``ref_origin[j]`` names the one or two
    clips reference j was made from (a real clip: itself twice; a SMOTE point: its two parents).
    References made from the test row's own clip are excluded (leave-one-out). ``ref_scale[j]``
    (> 0) divides every distance to reference j before the nearest are chosen (local density).
    """
    out = np.empty(len(test_unit), dtype=np.float64)
    ref_norms = (ref_unit.astype(np.float64) ** 2).sum(axis=1) if euclidean else None
    for start in range(0, len(test_unit), _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        if euclidean:
            part = test_unit[start:stop].astype(np.float64)
            dist = (part**2).sum(axis=1, keepdims=True) + ref_norms[None, :] - 2.0 * part @ ref_unit.T
            dist /= ref_unit.shape[1]
        else:
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
# BEAM + VarMin on per-band embeddings
# --------------------------------------------------------------------------------------------------
def beam_distance(test, ref, *, varmin: bool = True, beam_neighbours: int = 4) -> np.ndarray:
    """BEAM (+ VarMin) score of each test clip [M, F, D] against the reference clips [R, F, D].

    Per band f: ``min_i 0.5 (1 - cos(test[f], ref[i, f])) - alpha[f] b[i, f]`` (``BeamBackend``);
    the score is the mean over bands. ``varmin=False`` is plain BEAM (``alpha = 0``). Returns [M].
    """
    test = _as_embeddings("test", test)
    ref = _as_embeddings("ref", ref)
    for name, x in (("test", test), ("ref", ref)):
        if x.ndim != 3:
            raise ValueError(f"beam_distance {_PER_BAND_HINT} ({name} has shape {x.shape})")
    _check_same_dims(test, ref)
    options = dict(varmin=varmin, beam_neighbours=beam_neighbours)
    BeamBackend.check(options, None)
    return BeamBackend().fit(ref, **options).distances(test)


class _BandMemory:
    """Unit-length reference bands [F, R, D] and the BEAM distance ``0.5 (1 - cos)`` to them."""

    def __init__(self, references: np.ndarray):
        self.bands = np.ascontiguousarray(_unit_rows("references", references).transpose(1, 0, 2))

    def rows_per_chunk(self) -> int:
        # A block is [F, rows, R]: keep it near _CHUNK_ROWS x R floats whatever the number of bands.
        return max(1, _CHUNK_ROWS // self.bands.shape[0])

    def distances(self, unit_bands: np.ndarray) -> np.ndarray:
        """[F, rows, D] unit vectors -> [F, rows, R] distances (float32), in place of the cosines."""
        block = np.matmul(unit_bands, self.bands.transpose(0, 2, 1))
        block *= -0.5
        block += 0.5
        return block

    def neighbourhood(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per reference and band, itself left out: the mean distance to its ``n`` nearest references
        ``b`` [R, F], its nearest reference [R, F] and the distance to it [R, F]."""
        bands, refs = self.bands.shape[:2]
        spread = np.empty((refs, bands))
        nearest = np.empty((refs, bands), dtype=np.int64)
        nearest_distance = np.empty((refs, bands))
        step = self.rows_per_chunk()
        for start in range(0, refs, step):
            rows = np.arange(start, min(start + step, refs))
            block = self.distances(self.bands[:, rows])
            block[:, rows - start, rows] = np.inf  # a reference is not its own neighbour
            closest = block.argmin(axis=2)
            nearest[rows] = closest.T
            nearest_distance[rows] = np.take_along_axis(block, closest[..., None], axis=2)[..., 0].T
            spread[rows] = np.partition(block, n - 1, axis=2)[..., :n].mean(axis=2, dtype=np.float64).T
        return spread, nearest, nearest_distance


def varmin_alpha(nearest_distance: np.ndarray, nearest_spread: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-band VarMin coefficient: ``alpha[f] = Cov_z(u, v) / Var_z(v)``, the ``alpha`` that minimises
    the variance of ``u - alpha v`` over the normal clips z, where ``u[z, f]`` is clip z's
    leave-one-out nearest distance and ``v[z, f]`` that nearest reference's spread ``b``. A band
    whose ``Var(v) <= eps`` gets 0 (as beam.md); alpha is not clipped, so scores may be negative."""
    u = nearest_distance - nearest_distance.mean(axis=0)
    v = nearest_spread - nearest_spread.mean(axis=0)
    variance = (v * v).mean(axis=0)
    covariance = (u * v).mean(axis=0)
    return np.where(variance > eps, covariance / np.where(variance > eps, variance, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# Backends: one class per distance, one registry
# --------------------------------------------------------------------------------------------------
class Backend(abc.ABC):
    """One way to measure how far test embeddings lie from one reference set.

    A backend declares what it takes; ``score_group`` does the rest for every backend alike (the
    reference sets of the domains, leave-one-out bookkeeping, SMOTE points, the domain
    normalisations, the smaller distance over the sets):

    * ``name``: its key in ``REGISTRY`` and in system names (``<branch>-<name>-<policy>``);
    * ``options``: its own settings with their defaults (``k``, ``shrinkage``...). A setting only
      other backends take is ignored, so one mapping of options serves every backend (and
      ``score_branches`` takes ``{backend: value}`` for one backend's value);
    * ``normalisations``: the ``NORMALISATIONS`` it supports. ``domain_mean`` / ``domain_zscore``
      are applied by ``score_group`` from ``distances``; any other one (``local_density``) is the
      backend's own, done in ``fit``;
    * ``smote``: whether it takes synthetic (SMOTE) references;
    * ``per_band``: True when it needs per-band embeddings [N, F, D]; other backends see a per-band
      clip flattened to [F * D].

    ``check(options, normalisation)`` rejects bad option values before any work. ``fit(references,
    normalisation=..., **options)`` learns from the real references [R, ...]; a SMOTE backend also
    gets ``synthetic`` points and their ``parents`` [S, 2] (rows of ``references``).
    ``distances(test, loo)`` returns [M] float64, where ``loo[i]`` is the reference row test row i
    is (-1: none): that reference, and synthetic points made from it, are left out for row i.
    """

    name: ClassVar[str]
    options: ClassVar[dict] = {}
    normalisations: ClassVar[tuple] = (None,)
    smote: ClassVar[bool] = False
    per_band: ClassVar[bool] = False

    @classmethod
    def check(cls, options: dict, normalisation) -> None:
        """Raise ValueError for an option value the backend cannot use (``options`` holds its own)."""
        return  # nothing to check unless a backend says otherwise

    @abc.abstractmethod
    def fit(self, references: np.ndarray, *, normalisation=None, **options) -> Backend: ...

    @abc.abstractmethod
    def distances(self, test: np.ndarray, loo: np.ndarray | None = None) -> np.ndarray: ...


REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` a scoring backend under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"a scoring backend named {cls.name!r} is registered already")
    unknown = sorted(set(cls.normalisations) - set(NORMALISATIONS), key=str)
    if unknown:
        raise ValueError(f"backend {cls.name!r}: unknown normalisations {unknown}; known: {NORMALISATIONS}")
    REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def _backend_options(kind: type[Backend], given: dict) -> dict:
    """The backend's own options from ``given`` (defaults where absent); names no backend takes are an error."""
    known = {name for cls in REGISTRY.values() for name in cls.options}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown scoring option(s) {unknown}; the backends take {sorted(known)}")
    return {name: given.get(name, default) for name, default in kind.options.items()}


def _takers(normalisation: str) -> str:
    """The backends offering ``normalisation``, as an error message names them: ``backend='knn'`` or
    ``backend in ('knn', 'mahalanobis')``."""
    names = tuple(name for name, cls in REGISTRY.items() if normalisation in cls.normalisations)
    return f"backend={names[0]!r}" if len(names) == 1 else f"backend in {names}"


@register_backend
class KnnBackend(Backend):
    """Mean cosine distance to the ``k`` nearest references (``knn_distance``), optionally with each
    reference's distances scaled by its local density (``normalisation="local_density"``)."""

    name = "knn"
    options = {"k": 1, "density_k": 1}
    euclidean = False  # the cosine distance (a subclass may measure Euclidean distances instead)
    normalisations = (None, "domain_mean", "domain_zscore", "local_density")
    smote = True

    @classmethod
    def check(cls, options, normalisation):
        if normalisation == "local_density":
            if options.get("smote"):
                raise ValueError(
                    "normalisation='local_density' and smote both re-weight the target domain; use one"
                )
            _positive_int("density_k", options["density_k"])

    def fit(self, references, *, normalisation=None, k=1, density_k=1, synthetic=None, parents=None):
        self.k, self.n_real = k, len(references)
        origin = np.repeat(np.arange(self.n_real)[:, None], 2, axis=1)
        self.n_smote = 0 if synthetic is None else len(synthetic)
        if self.n_smote:
            references = np.concatenate([references, synthetic])
            origin = np.concatenate([origin, parents])
        self.origin = origin
        self.ref_unit = self._rows("train_emb", references)
        self.scale = None
        if normalisation == "local_density":
            _check_k(
                density_k,
                self.n_real - 1,
                f"reference set of {self.n_real} clips (density_k, itself left out)",
            )
            # Each reference's mean distance to its density_k nearest other references (itself left out).
            self.scale = _knn_from_unit(
                self.ref_unit,
                self.ref_unit,
                density_k,
                np.arange(len(self.ref_unit)),
                origin,
                euclidean=self.euclidean,
            )
            if not (self.scale > 0).all():
                raise DegenerateScoresError(
                    f"{int((self.scale <= 0).sum())} references have {density_k} identical neighbours "
                    "(collapsed embeddings?): their local density is undefined"
                )
        return self

    def distances(self, test, loo=None):
        # A left-out clip loses itself, so the set must hold k others.
        left_out = 1 if loo is not None and (loo >= 0).any() else 0
        _check_k(
            self.k,
            self.n_real + self.n_smote - left_out,
            f"reference set of {self.n_real} clips (+{self.n_smote} SMOTE)",
        )
        return _knn_from_unit(
            self._rows("test_emb", test), self.ref_unit, self.k, loo, self.origin, self.scale, self.euclidean
        )

    def _rows(self, name: str, x: np.ndarray) -> np.ndarray:
        """What the distance sees: unit rows for the cosine, the rows as they are for Euclidean."""
        return np.asarray(x, dtype=np.float32) if self.euclidean else _unit_rows(name, x)


@register_backend
class MahalanobisBackend(Backend):
    """Mahalanobis distance to the references' shrinkage Gaussian (``mahalanobis_distance``), with
    the exact leave-one-out distance for a reference clip (``_ShrunkGaussian.leave_one_out``)."""

    name = "mahalanobis"
    options = {"shrinkage": "ledoit_wolf"}
    normalisations = (None, "domain_mean", "domain_zscore")

    def fit(self, references, *, normalisation=None, shrinkage="ledoit_wolf"):
        self.gaussian = _ShrunkGaussian(references, shrinkage)
        return self

    def distances(self, test, loo=None):
        squared = self.gaussian.squared_distance(test)
        if loo is not None:
            member = loo >= 0
            squared[member] = self.gaussian.leave_one_out(squared[member])
        return np.sqrt(squared)


@register_backend
class BeamBackend(Backend):
    """BEAM + VarMin over per-band embeddings (kasahart/asd-experiments ``src/asd_min/beam.md``).

    One memory of reference clips [R, F, D] (the group's normal source and target clips together
    unless ``separate_domains``). With ``D(q, y) = 0.5 (1 - cos(q, y))`` per band:

    * ``b[i, f]``: reference i's mean distance to its ``beam_neighbours`` nearest other references;
    * VarMin, on the references themselves, each left out of its own comparison: ``u[z, f]`` is the
      distance from reference z to its nearest other reference ``j(z, f)`` and ``v[z, f] = b[j, f]``;
      ``alpha[f] = Cov(u, v) / Var(v)`` (``varmin_alpha``);
    * the score of clip q: ``mean_f min_i (D(q[f], y[i, f]) - alpha[f] b[i, f])``: the correction is
      applied before the nearest reference is chosen, so it can choose another reference.

    ``varmin=False`` keeps ``alpha = 0``: plain BEAM, the mean over bands of each band's nearest
    distance. The score is not clipped and may be negative, so ``domain_mean`` (a division by the
    mean leave-one-out score) is not offered; ``domain_zscore`` is.
    """

    name = "beam"
    options = {"beam_neighbours": 4, "varmin": True}
    normalisations = (None, "domain_zscore")
    per_band = True

    @classmethod
    def check(cls, options, normalisation):
        _positive_int("beam_neighbours", options["beam_neighbours"])
        if not isinstance(options["varmin"], (bool, np.bool_)):
            raise ValueError(f"varmin must be True or False, got {options['varmin']!r}")

    def fit(self, references, *, normalisation=None, beam_neighbours=4, varmin=True):
        self.memory = _BandMemory(references)
        bands, refs = self.memory.bands.shape[:2]
        self.spread = np.zeros((refs, bands))
        self.alpha = np.zeros(bands)
        if varmin:
            if refs <= beam_neighbours:
                raise ValueError(
                    f"VarMin needs more than beam_neighbours={beam_neighbours} references, the memory "
                    f"has {refs} clips: lower beam_neighbours or set varmin=False"
                )
            self.spread, nearest, nearest_distance = self.memory.neighbourhood(beam_neighbours)
            nearest_spread = np.take_along_axis(self.spread, nearest, axis=0)
            self.alpha = varmin_alpha(nearest_distance, nearest_spread)
        return self

    def distances(self, test, loo=None):
        unit = _unit_rows("test_emb", test).transpose(1, 0, 2)  # [F, M, D]
        offset = (self.alpha * self.spread).T[:, None, :].astype(np.float32)  # [F, 1, R]
        out = np.empty(unit.shape[1], dtype=np.float64)
        step = self.memory.rows_per_chunk()
        for start in range(0, len(out), step):
            stop = min(start + step, len(out))
            block = self.memory.distances(np.ascontiguousarray(unit[:, start:stop]))
            block -= offset
            if loo is not None:
                own = loo[start:stop]
                rows = np.flatnonzero(own >= 0)
                block[:, rows, own[rows]] = np.inf  # leave-one-out: never its own reference
            out[start:stop] = block.min(axis=2).mean(axis=0, dtype=np.float64)
        return out


@register_backend
class WhitenedKnnBackend(KnnBackend):
    """KNN after whitening: the references' mean is removed and their shrinkage covariance (as
    Mahalanobis estimates it) made the identity, for references and test clips alike; then the mean
    squared Euclidean distance (per dimension) to the ``k`` nearest references. Strong systems whiten
    frozen pretrained embeddings before KNN: the directions along which normal clips vary most
    (recording conditions, noise) no longer dominate, and a clip far out along a quiet direction is far
    (a cosine would see only its direction). Mahalanobis is the same whitening with one Gaussian instead
    of the nearest neighbours."""

    name = "knn_white"
    options = {"k": 1, "shrinkage": "ledoit_wolf"}
    normalisations = (None,)
    smote = False
    euclidean = True

    @classmethod
    def check(cls, options, normalisation):
        return  # KnnBackend's checks are for local_density, which this backend does not offer

    def fit(self, references, *, normalisation=None, k=1, shrinkage="ledoit_wolf"):
        gaussian = _ShrunkGaussian(np.asarray(references, dtype=np.float64), shrinkage)
        self.mean, self.factor = gaussian.mean, gaussian.chol
        return super().fit(self._whiten(references), normalisation=normalisation, k=k)

    def _whiten(self, x: np.ndarray) -> np.ndarray:
        # L^-1 (x - mean) for the shrinkage covariance C = L L^T: identity covariance under C
        diff = (np.asarray(x, np.float64) - self.mean).T
        return scipy.linalg.solve_triangular(self.factor, diff, lower=True, check_finite=False).T

    def distances(self, test, loo=None):
        return super().distances(self._whiten(test), loo)


BACKENDS = tuple(REGISTRY)


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
    seed: int = 0,
    loo_index=None,
    normalisation: str | None = None,
    **options,
) -> np.ndarray:
    """Score ``test_emb`` [M, ...] against the normal training embeddings ``train_emb`` [R, ...] of one group.

    Embeddings are clip embeddings [N, D] or per-band embeddings [N, F, D] (see ``Backend.per_band``).

    * ``backend``: a name in ``REGISTRY`` (``BACKENDS``). ``k`` and ``options`` are backend
      settings (``Backend.options``: ``k`` and ``density_k`` for knn, ``shrinkage`` for
      mahalanobis, see ``mahalanobis_distance``, ``beam_neighbours`` and ``varmin`` for beam); a
      backend ignores the settings of the others, a name no backend takes is an error.
    * ``separate_domains=False``: one reference set of all training clips. ``True``: source and
      target references (``train_domain`` "source" / "target") are scored apart and the smaller
      distance is kept, so a clip close to either domain's normal data scores low.
    * ``smote``: that many synthetic target references (``smote_oversample`` of the target clips,
      seeded by ``seed``) join the target (or pooled) references. Backends with ``smote`` only
      (knn): interpolated points add no direction to a covariance.
    * ``loo_index[i]``: the row of ``train_emb`` that test row i is, same clip and same embedding (-1
      when it is not a reference); that clip, and SMOTE points made from it, are left out of test
      row i's references.
    * ``normalisation`` (``NORMALISATIONS``, see the module docstring): None keeps the raw distances.
      ``"domain_mean"`` divides each reference set's distances by the mean of its members'
      leave-one-out distances to it (same backend, settings and SMOTE points), ``"domain_zscore"``
      subtracts that mean and divides by the standard deviation; both need ``separate_domains``
      (with one pooled set they change no ranking). ``"local_density"`` (KNN, no SMOTE) divides the
      distance to reference j by the mean distance from j to its ``density_k`` nearest other
      references of the same set; a left-out training clip keeps its place in the other
      references' densities (a 1/R effect). A backend offers those in its ``normalisations``.

    Returns [M] float64 scores, larger = more anomalous.
    """
    kind = backend_class(backend)
    settings = _backend_options(kind, {"k": k, **options})
    test_emb, train_emb = _embeddings_for(kind, test_emb, train_emb)
    train_domain = np.asarray(train_domain, dtype=object)
    if len(train_domain) != len(train_emb):
        raise ValueError(
            f"train_domain has {len(train_domain)} entries for {len(train_emb)} training embeddings"
        )
    _check_smote(smote, kind, train_domain)
    _check_normalisation(normalisation, kind, separate_domains)
    kind.check({**settings, "smote": smote}, normalisation)
    loo = _check_loo_index(loo_index, len(test_emb), len(train_emb))
    reference_sets = _reference_sets(train_domain, separate_domains)
    target_rows = np.flatnonzero(train_domain == "target")

    scores = np.full(len(test_emb), np.inf)
    for rows in reference_sets:
        extra = {}
        # SMOTE points join whichever reference set holds the target clips.
        if smote > 0 and np.isin(target_rows, rows).all():
            synthetic, parents = smote_oversample(train_emb[target_rows], smote, seed=seed)
            # rows is sorted, so searchsorted gives each target clip's row within the set
            extra = dict(synthetic=synthetic, parents=np.searchsorted(rows, target_rows)[parents])
        fitted = kind().fit(train_emb[rows], normalisation=normalisation, **settings, **extra)
        distance = fitted.distances(test_emb, _local_loo(loo, rows, len(train_emb)))
        if normalisation in _DOMAIN_NORMALISATIONS:
            # The set's own clips, each left out of the set: how far a normal clip of this domain lies.
            own = fitted.distances(train_emb[rows], np.arange(len(rows)))
            distance = _standardise_by_own(distance, own, normalisation, train_domain[rows[0]])
        scores = np.minimum(scores, distance)
    if not np.isfinite(scores).all():
        if "k" in kind.options:
            raise ValueError(
                f"k={k} leaves some clips without {k} references once their own clip is left out"
            )
        raise ValueError(f"{backend}: some clips have no reference left once their own clip is left out")
    return scores


def _embeddings_for(kind: type[Backend], test_emb, train_emb) -> tuple[np.ndarray, np.ndarray]:
    """Checked embeddings in the shape the backend takes: per-band ones flattened for a clip backend."""
    test_emb = _as_embeddings("test_emb", test_emb)
    train_emb = _as_embeddings("train_emb", train_emb)
    _check_same_dims(test_emb, train_emb)
    if kind.per_band and train_emb.ndim != 3:
        raise ValueError(f"backend {kind.name!r} {_PER_BAND_HINT} (got [N, D] clip embeddings)")
    if not kind.per_band and train_emb.ndim == 3:
        test_emb, train_emb = (x.reshape(len(x), -1) for x in (test_emb, train_emb))
    return test_emb, train_emb


def _local_loo(loo: np.ndarray | None, rows: np.ndarray, n_train: int) -> np.ndarray | None:
    """``loo`` (training rows) as rows of the reference set ``rows`` (-1 where outside it)."""
    if loo is None:
        return None
    local = np.full(n_train, -1)
    local[rows] = np.arange(len(rows))
    return np.where(loo >= 0, local[np.maximum(loo, 0)], -1)


def _check_smote(smote, kind: type[Backend], train_domain: np.ndarray) -> None:
    if not isinstance(smote, (int, np.integer)) or smote < 0:
        raise ValueError(f"smote must be a non-negative integer, got {smote!r}")
    if smote and not kind.smote:
        names = [name for name, cls in REGISTRY.items() if cls.smote]
        raise ValueError(f"smote oversampling applies to the {' and '.join(names)} backend only")
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


def _check_normalisation(normalisation, kind: type[Backend], separate_domains: bool) -> None:
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if normalisation in _DOMAIN_NORMALISATIONS and not separate_domains:
        raise ValueError(
            f"normalisation={normalisation!r} puts separate source and target references on one scale: "
            "it needs separate_domains=True (on one pooled set it would change no ranking)"
        )
    if normalisation not in kind.normalisations:
        purpose = _NORMALISATION_PURPOSE.get(normalisation, "is not offered by this backend")
        raise ValueError(
            f"normalisation={normalisation!r} {purpose}: it needs {_takers(normalisation)} (not {kind.name!r})"
        )


_NORMALISATION_PURPOSE = {
    "local_density": "scales KNN distances",
    "domain_mean": "divides by the references' mean leave-one-out distance, which must be positive",
}


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
    seed: int = 0,
    normalisation: str | None = None,
    residual_scale: float = 1.0,
    far_directions: int = 0,
    progress: bool = True,
    **options,
) -> pd.DataFrame:
    """Score every clip of ``(items, emb)`` per (dataset, machine, section) group.

    ``emb`` holds clip embeddings [N, D] or per-band embeddings [N, F, D]. References are the
    group's normal training clips of the same channel; training clips are scored leave-one-out.
    ``backend``, ``k``, ``separate_domains``, ``smote``, ``seed``, ``normalisation`` and the backend
    settings in ``options`` (``shrinkage``, ``density_k``, ``beam_neighbours``, ``varmin``) are
    those of ``score_group``. ``channel_policy`` decides what one clip's score is made of (the
    output ``channel`` column names the policy):

    * ``"near"``: the near-channel embedding against near references (the submitted channel).
    * ``"far"``: the far-channel embedding against far references.
    * ``"mean"``: near and far scored apart and their raw scores averaged per clip (the EAT-ASP
      report's score-level fusion of the two channels' 1-NN scores).
    * ``"zmean"``: near and far scored apart, each standardised with the mean and standard
      deviation of its own training-clip (leave-one-out) scores, then averaged per clip (the two
      channels' distances can live on different scales; this puts them on one).
    * ``"residual"``: the noise-aware policy. The far microphone hears the environment about as the
      near one does but the machine less, so ``near_emb - residual_scale * far_emb`` cancels what
      both share (noise) and keeps the machine part; the residual is rescaled to unit length (per
      band for per-band embeddings) and scored as its own channel (references: the residuals of
      the normal training clips). ``residual_scale`` 1 by default; Kim_LUDO's 2026 system used 0.5.
    * ``"orthogonal"``: the near embedding with the far channel's noise direction removed
      (``remove_far_directions``): from every near embedding, test and reference alike, its
      component along its own clip's far embedding (centred on the group's normal far
      embeddings), and with ``far_directions`` > 0 also along that many principal directions of
      the group's normal far embeddings, per band for per-band embeddings; rescaled to unit length
      and scored as its own channel. Unlike ``residual`` it needs no gain: whatever amount of the
      clip's far-channel noise the near embedding carries, it is removed.
    * ``"auto"`` or an embedded channel (a canceller such as ``"w1"``): see ``choose_channel``.

    Returns a scores DataFrame (``SCORE_COLUMNS``), one row per clip, training clips included when
    ``include_train``.
    """
    if _base_policy(channel_policy) not in CHANNEL_POLICIES + data.channel_names():
        raise ValueError(
            f"channel_policy must be one of {CHANNEL_POLICIES} (residual@A: residual with far gain A) or an "
            f"embedded channel ({', '.join(data.channel_names())}), got {channel_policy!r}"
        )
    if channel_policy.startswith("residual@"):  # the policy names its own far gain
        residual_scale = _residual_gain(channel_policy)
    kind = backend_class(backend)
    _backend_options(kind, {"k": k, **options})  # a misspelt setting fails before any work
    emb = _as_embeddings("emb", emb)
    if kind.per_band and emb.ndim != 3:
        raise ValueError(f"backend {backend!r} {_PER_BAND_HINT} (got embeddings of shape {emb.shape})")
    _check_residual_scale(residual_scale)
    _check_far_directions(far_directions)
    _check_items(items, emb)
    items = items.reset_index(drop=True)
    candidates = ["near"] + [c for c in dict.fromkeys(items["channel"]) if c not in ("near", "far")]
    options = dict(
        backend=backend,
        k=k,
        separate_domains=separate_domains,
        smote=smote,
        seed=seed,
        normalisation=normalisation,
        **options,
    )

    parts = []
    groups = items.groupby(GROUP_COLUMNS, sort=False)
    for _, group in tqdm(
        groups, total=groups.ngroups, desc=f"score {backend}/{channel_policy}", disable=not progress
    ):
        label = channel_policy
        if _base_policy(channel_policy) not in _PAIRED_POLICIES:
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
            elif _base_policy(channel_policy) == "residual":
                near, far = emb[near_rows].astype(np.float32), emb[far_rows].astype(np.float32)
                residual = _unit_rows("near - far residual", near - np.float32(residual_scale) * far)
                scores = _score_channel(clips, residual, options, include_train)
            else:
                kept = remove_far_directions(
                    emb[near_rows], emb[far_rows], _is_reference(clips), far_directions
                )
                kept = _unit_rows("near orthogonal to far", kept)
                scores = _score_channel(clips, kept, options, include_train)
        part = clips[_ITEM_COLUMNS].assign(channel=label, score=scores)
        parts.append(part if include_train else part[part["split"] != "train"])
    if not parts:
        return pd.DataFrame(columns=SCORE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[SCORE_COLUMNS]


def _is_reference(clips: pd.DataFrame) -> np.ndarray:
    return ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()


def _check_residual_scale(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(
            f"residual_scale must be a finite number (near - residual_scale * far), got {value!r}"
        )


def _check_far_directions(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"far_directions must be a non-negative integer, got {value!r}")


def remove_far_directions(near, far, reference, far_directions: int = 0) -> np.ndarray:
    """The near embeddings with the far channel's noise directions projected out (the
    ``"orthogonal"`` channel policy), for one group's clips paired row by row.

    ``near`` and ``far``: [N, D], or [N, F, D] handled band by band; ``reference``: [N] bool, the
    group's normal training clips. Each clip's noise direction is its far embedding minus the mean
    far embedding of the references: that mean is what the far microphone hears on every clip (the
    machine, the usual environment, and whatever every embedding shares), so it is not removed;
    what changes from clip to clip at the far microphone, where the machine is weaker, is mostly
    the environment. Every near embedding, test and reference alike, loses its component along
    its own clip's noise direction; with ``far_directions`` = p > 0 it also loses its components
    along the top p principal directions of the references' centred far embeddings (noise that
    recurs over the recordings), the clip's own direction then taken orthogonal to them (the
    projection removes their span). A clip whose far embedding is the mean has no direction of its
    own to remove. The cost: the machine's part along the removed directions (about p + 1 of D
    dimensions). Returns float64 of ``near``'s shape.
    """
    near = np.asarray(near, dtype=np.float64)
    far = np.asarray(far, dtype=np.float64)
    reference = np.asarray(reference, dtype=bool)
    if near.shape != far.shape or near.ndim not in (2, 3):
        raise ValueError(
            f"near and far must be paired embeddings of one shape [N, D] or [N, F, D], got {near.shape} and {far.shape}"
        )
    if reference.shape != (len(near),) or not reference.any():
        raise ValueError(f"reference must be a [{len(near)}] boolean mask with at least one reference clip")
    _check_far_directions(far_directions)
    if far_directions >= min(int(reference.sum()), near.shape[-1]):
        raise ValueError(
            f"far_directions={far_directions} must be below the {int(reference.sum())} reference clips "
            f"and the {near.shape[-1]} dimensions"
        )
    per_band = near.ndim == 3
    if not per_band:
        near, far = near[:, None], far[:, None]
    noise = far - far[reference].mean(axis=0)
    kept = near.copy()
    own_norm = np.linalg.norm(noise, axis=-1, keepdims=True)
    if far_directions:
        centred = noise[reference].transpose(1, 0, 2)  # [F, R, D]
        _, vectors = np.linalg.eigh(np.matmul(centred.transpose(0, 2, 1), centred))  # ascending
        basis = vectors[:, :, ::-1][:, :, :far_directions]  # [F, D, p]
        for x in (kept, noise):
            x -= np.einsum("nfp,fdp->nfd", np.einsum("nfd,fdp->nfp", x, basis), basis)
    norm = np.linalg.norm(noise, axis=-1, keepdims=True)
    # Round-off left after the principal directions (or a far embedding at the mean) has no direction.
    has_direction = norm > 1e-9 * np.maximum(own_norm, np.finfo(float).tiny)
    unit = np.divide(noise, norm, out=np.zeros_like(noise), where=has_direction)
    kept -= np.sum(kept * unit, axis=-1, keepdims=True) * unit
    return kept if per_band else kept[:, 0]


def channel_separability(clips: pd.DataFrame, emb: np.ndarray) -> float:
    """How well a channel's embeddings of the normal training clips tell their conditions apart:
    the balanced leave-one-out 1-NN (cosine) accuracy of predicting each clip's attributes + domain
    from the others. Noise that masks the machine, or a canceller that removes machine sound, blurs
    these conditions; no test clip and no anomaly label is used."""
    train = ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()
    labels = (clips["attributes"].astype(str) + "|" + clips["domain"].astype(str)).to_numpy()[train]
    if len(set(labels)) < 2 or len(labels) < 3:
        return 0.0
    unit = _unit_rows("embeddings", emb[train].reshape(int(train.sum()), -1))  # per-band: whole clips
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
    if policy == "far" or _base_policy(policy) in _PAIRED_POLICIES:
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
            unknown = sorted(set(value) - set(REGISTRY))
            if unknown:
                raise ValueError(
                    f"{key}: per-backend values must be keyed by {tuple(REGISTRY)}, got {unknown}"
                )
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
    branch has not embedded (far, a canceller) are skipped, and so are per-band backends (beam) for
    a branch of clip embeddings [N, D]; ``auto`` is there whenever near is (it is the near channel
    where no canceller was embedded, so a fusion list naming it runs on any data). A combination
    whose training scores are degenerate (``DegenerateScoresError``) is left out with a warning
    naming it, so one collapsed branch does not stop the others from being scored."""
    kinds = [backend_class(backend) for backend in backends]
    systems = {}
    for branch, (items, emb) in embeddings.items():
        present = set(items["channel"])
        for kind in kinds:
            if kind.per_band and np.ndim(emb) != 3:
                continue
            for policy in channel_policies:
                if not _policy_applies(policy, present):
                    continue
                name = f"{branch}-{kind.name}-{policy}"
                try:
                    systems[name] = score_embeddings(
                        items,
                        emb,
                        backend=kind.name,
                        channel_policy=policy,
                        **_for_backend(options, kind.name),
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
