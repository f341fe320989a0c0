"""Score normalisation, fusion of several systems, and the fusion-weight search.

A system is one scores DataFrame (``kit.scoring.SCORE_COLUMNS``: one set of scores for every clip,
as a DCASE submission has). Systems live on different scales (cosine distances, Mahalanobis distances, reconstruction
errors), so before they are added each is standardised per (dataset, machine, section, channel):

* ``by="train"``: with the mean and standard deviation of that system's scores on the normal
  training clips (scored leave-one-out by ``kit.scoring``): a z-score against the normal bank.
* ``by="test"``: with the statistics of the test clips themselves; needs no labels and no training
  scores, but moves with the test set's anomaly share.

The fused score of a clip is a weighted mean of its normalised system scores. Rules that need no
labels: ``mean``, ``max``, and ``agreement``, which weights each system per (dataset, machine,
section) by how much it agrees with the others on that section's test clips (below): a system that
ranks the clips at random agrees with nobody and gets about no weight, so a weak system no longer drags
the mean. ``search_weights`` picks the non-negative weights by Bayesian optimisation (package
``bayesian-optimization``) to maximise the official score (``kit.metrics``) on the development test
clips: fitted on labels.

The ``agreement`` weights are the spectral meta-learner of Parisi, Strino, Nadler and Kluger
("Ranking and combining multiple predictors without labeled data", PNAS 2014). If systems err
independently given the (unknown) label, the covariance between two systems' ranks of the test clips
is ``v_i v_j`` off the diagonal, with ``v_i`` proportional to how well system i separates normal from
anomalous clips (its balanced accuracy or AUC minus a half). So the leading eigenvector of that
covariance, with its diagonal fitted to the rank-one model, estimates every system's quality without a
label; its positive part, normalised, weights the systems' training-standardised scores. With fewer
than three systems the model cannot be identified and the rule is the mean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from bayes_opt import BayesianOptimization, acquisition
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from kit import metrics
from kit.files import write_text_atomic
from kit.scoring import CLIP_KEY, SCORE_COLUMNS

NORMALISE_BY = ("train", "test")
LABEL_FREE_RULES = ("mean", "max", "agreement")
AGREEMENT_GROUP = ["dataset", "machine", "section"]


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def _check_scores(scores: pd.DataFrame, name: str) -> None:
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; scores need {SCORE_COLUMNS}")
    if scores.empty:
        raise ValueError(f"{name} holds no scores")
    values = pd.to_numeric(scores["score"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).all():
        row = scores.iloc[int(np.argmax(~np.isfinite(values)))]
        raise ValueError(f"{name}: score {row['score']!r} of {row[CLIP_KEY].tolist()} is not a finite number")
    repeated = scores.duplicated(CLIP_KEY)
    if repeated.any():
        raise ValueError(
            f"{name}: clip {scores.loc[repeated, CLIP_KEY].iloc[0].tolist()} is listed more than once"
        )


def normalise(scores: pd.DataFrame, by: str = "train") -> pd.DataFrame:
    """Standardise scores per (dataset, machine, section, channel [, system]) group.

    ``by="train"``: subtract the mean and divide by the standard deviation of the group's normal
    training-clip scores (score with ``include_train=True``). ``by="test"``: use the group's test
    clips instead (label-free). Every row of the group, training and test, is transformed with the
    same statistics. Returns a copy; raises ValueError for a group without reference clips or with
    constant reference scores.
    """
    if by not in NORMALISE_BY:
        raise ValueError(f"normalise by must be one of {NORMALISE_BY}, got {by!r}")
    _check_scores(scores, "scores")
    group_columns = ["dataset", "machine", "section", "channel"] + (["system"] if "system" in scores else [])
    if by == "train":
        is_reference = (scores["split"] == "train") & (scores["label"] == "normal")
    else:
        is_reference = scores["split"] == "test"
    values = scores["score"].astype(float)
    grouped = values[is_reference].groupby([scores.loc[is_reference, c] for c in group_columns])
    # Population standard deviation (ddof 0): the reference rows then have unit std exactly.
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0)})
    keys = pd.MultiIndex.from_frame(scores[group_columns])
    mean = stats["mean"].reindex(keys).to_numpy()
    std = stats["std"].reindex(keys).to_numpy()
    if np.isnan(mean).any():
        group = scores[group_columns].iloc[int(np.argmax(np.isnan(mean)))].tolist()
        hint = (
            "score with include_train=True or normalise by 'test'"
            if by == "train"
            else "it has no test clips"
        )
        raise ValueError(f"group {group} has no {by} clips to normalise with ({hint})")
    if not (std > 0).all():
        group = scores[group_columns].iloc[int(np.argmax(~(std > 0)))].tolist()
        raise ValueError(f"group {group}: the {by} reference scores are constant, cannot standardise them")
    return scores.assign(score=(values.to_numpy() - mean) / std)


# --------------------------------------------------------------------------------------------------
# Alignment and fusion
# --------------------------------------------------------------------------------------------------
def _aligned(systems: Mapping[str, pd.DataFrame], normalise_by: str | None):
    """``(clips, matrix [clips, systems], names)``: the systems' (normalised) scores side by side."""
    if not isinstance(systems, Mapping) or not systems:
        raise ValueError("systems must be a non-empty dict of name -> scores DataFrame")
    names = list(systems)
    for name in names:
        _check_scores(systems[name], f"system {name!r}")
    prepared = {
        name: normalise(frame, normalise_by) if normalise_by else frame for name, frame in systems.items()
    }
    first = prepared[names[0]].reset_index(drop=True)
    keys = pd.MultiIndex.from_frame(first[CLIP_KEY])
    columns, same_channel = [], True
    for name in names:
        indexed = prepared[name].set_index(CLIP_KEY)
        missing, extra = keys.difference(indexed.index), indexed.index.difference(keys)
        if len(missing) or len(extra):
            example = list(missing[0]) if len(missing) else list(extra[0])
            raise ValueError(
                f"systems {names[0]!r} and {name!r} do not cover the same clips: {len(missing)} clips of "
                f"{names[0]!r} missing from {name!r} and {len(extra)} extra (e.g. {example})"
            )
        aligned = indexed.reindex(keys)
        disagree = aligned["label"].to_numpy() != first["label"].to_numpy()
        if disagree.any():
            raise ValueError(
                f"systems {names[0]!r} and {name!r} disagree on the label of {list(keys[disagree][0])}"
            )
        same_channel &= bool((aligned["channel"].to_numpy() == first["channel"].to_numpy()).all())
        columns.append(aligned["score"].to_numpy(dtype=float))
    clips = first[SCORE_COLUMNS[:-1]].copy()
    if not same_channel:
        clips["channel"] = "fused"
    return clips, np.stack(columns, axis=1), names


def _weight_vector(weights: Mapping[str, float], names: list[str]) -> np.ndarray:
    unknown, absent = sorted(set(weights) - set(names)), [n for n in names if n not in weights]
    if unknown or absent:
        raise ValueError(
            f"weights must name exactly the systems {names}; unknown {unknown}, missing {absent}"
        )
    vector = np.array([float(weights[n]) for n in names])
    if not np.isfinite(vector).all() or (vector < 0).any():
        raise ValueError(f"fusion weights must be finite and non-negative, got {dict(zip(names, vector))}")
    if vector.sum() == 0:
        raise ValueError("fusion weights are all zero")
    return vector / vector.sum()


def _rank_one(cov: np.ndarray, iterations: int = 100) -> np.ndarray:
    """``v`` with ``v v^T`` fitting ``cov`` off its diagonal: the diagonal is replaced by the model's
    own (``v_i^2``) until it settles; the sign makes the sum of ``v`` positive."""
    fitted = cov.copy()
    k = len(cov)
    off = cov[~np.eye(k, dtype=bool)].reshape(k, k - 1)
    np.fill_diagonal(fitted, np.abs(off).mean(axis=1))
    v = np.zeros(k)
    for _ in range(iterations):
        values, vectors = np.linalg.eigh(fitted)
        new = vectors[:, -1] * math.sqrt(max(values[-1], 0.0))
        if np.allclose(new**2, np.diag(fitted), rtol=1e-6, atol=1e-12):
            v = new
            break
        v = new
        np.fill_diagonal(fitted, v**2)
    return v if v.sum() >= 0 else -v


def agreement_weights(clips: pd.DataFrame, matrix: np.ndarray) -> pd.DataFrame:
    """The ``agreement`` rule's weights: one row per (dataset, machine, section) with a weight per
    system column of ``matrix`` (``w0``, ``w1``, ...), from that section's test clips alone (no
    label is read). Equal weights where fewer than three systems or fewer than four test clips give
    nothing to fit, or where no system agrees with the others."""
    k = matrix.shape[1]
    rows = []
    for key, group in clips.groupby(AGREEMENT_GROUP, sort=False):
        test = group.index[(group["split"] == "test").to_numpy()].to_numpy()
        weights = np.full(k, 1.0 / k)
        if k >= 3 and len(test) >= 4:
            ranks = pd.DataFrame(matrix[test]).rank(axis=0).to_numpy() / len(test)
            quality = np.clip(_rank_one(np.cov(ranks, rowvar=False)), 0.0, None)
            if quality.sum() > 0:
                weights = quality / quality.sum()
        rows.append({**dict(zip(AGREEMENT_GROUP, key)), **{f"w{i}": w for i, w in enumerate(weights)}})
    return pd.DataFrame(rows)


def fuse(
    systems: Mapping[str, pd.DataFrame],
    weights: Mapping[str, float] | str = "mean",
    normalise_by: str | None = "train",
) -> pd.DataFrame:
    """Fuse systems clip by clip into one scores DataFrame (same columns).

    Each system is first normalised (``normalise(..., by=normalise_by)``; ``None`` when the systems
    are normalised already). ``weights``: a dict name -> non-negative weight (a weighted mean: the
    weights are divided by their sum, so weight 1 on one system returns that system), or a
    label-free rule, ``"mean"``, ``"max"`` (elementwise maximum) or ``"agreement"`` (a weighted mean
    with ``agreement_weights`` per section, see the module docstring). Clips are matched by (dataset,
    machine, section, split, file_name); systems must cover the same clips. The ``channel`` column
    is kept when every system has the same, else it reads ``"fused"``.
    """
    clips, matrix, names = _aligned(systems, normalise_by)
    if isinstance(weights, str):
        if weights not in LABEL_FREE_RULES:
            raise ValueError(f"weights must be a dict or one of {LABEL_FREE_RULES}, got {weights!r}")
        if weights == "agreement":
            table = agreement_weights(clips, matrix)
            per_row = clips[AGREEMENT_GROUP].merge(table, on=AGREEMENT_GROUP, how="left")
            fused = (matrix * per_row[[f"w{i}" for i in range(len(names))]].to_numpy()).sum(axis=1)
        else:
            fused = matrix.mean(axis=1) if weights == "mean" else matrix.max(axis=1)
    else:
        fused = matrix @ _weight_vector(weights, names)
    return clips.assign(score=fused)[SCORE_COLUMNS]


# --------------------------------------------------------------------------------------------------
# Weight search
# --------------------------------------------------------------------------------------------------
def official_objective(scores: pd.DataFrame) -> float:
    """The official score (hmean of every AUC(source), AUC(target) and pAUC) of labelled scores."""
    sections = metrics.section_metrics(scores)
    return metrics.official_score(sections[["auc_source", "auc_target", "pauc"]].to_numpy().ravel())


def _official_score_of_vectors(clips: pd.DataFrame) -> Callable[[np.ndarray], float]:
    """``official_objective`` as a function of a score vector over ``clips``'s rows.

    The search evaluates the objective dozens of times on the same clips: the section masks are
    built once here (``kit.metrics.section_metrics`` checks the sections once, with its errors), and
    each call is the same sklearn AUC/pAUC calls and floored harmonic mean.
    """
    metrics.section_metrics(clips.assign(score=0.0))
    sections = []
    for _, group in clips.groupby(["machine", "section"], sort=True):
        rows = group.index.to_numpy()
        anomalous = (group["label"] == "anomaly").to_numpy()
        target = (group["domain"] == "target").to_numpy()
        sections.append((rows, anomalous.astype(int), ~target | anomalous, target | anomalous))

    def official(values: np.ndarray) -> float:
        results = []
        for rows, y_true, source_mask, target_mask in sections:
            score = values[rows]
            results += [
                roc_auc_score(y_true[source_mask], score[source_mask]),
                roc_auc_score(y_true[target_mask], score[target_mask]),
                roc_auc_score(y_true, score, max_fpr=metrics.MAX_FPR),
            ]
        return metrics.official_score(results)

    return official


class _FewRestartsUCB(acquisition.UpperConfidenceBound):
    """bayes_opt's default acquisition (UCB, kappa 2.576) maximised with fewer L-BFGS-B restarts.

    The default ten restarts with numerical gradients dominate the search time (seconds per
    proposal); fusion weights are a smooth, low-dimensional problem where a few restarts from the
    best of 10,000 random candidates find the same proposals.
    """

    def __init__(self, restarts: int, random_state: int):
        super().__init__(kappa=2.576, random_state=random_state)
        self.restarts = restarts

    def suggest(self, gp, target_space, n_random=10_000, n_smart=10, fit_gp=True, random_state=None):
        return super().suggest(
            gp,
            target_space,
            n_random=n_random,
            n_smart=self.restarts,
            fit_gp=fit_gp,
            random_state=random_state,
        )


def _development_test_rows(clips: pd.DataFrame) -> np.ndarray:
    rows = ((clips["dataset"] == "dev") & (clips["split"] == "test")).to_numpy()
    if not rows.any():
        raise ValueError(
            "the weight search needs development test clips (dataset 'dev', split 'test'); none found"
        )
    unlabelled = ~clips.loc[rows, "label"].isin(["normal", "anomaly"]) | ~clips.loc[rows, "domain"].isin(
        ["source", "target"]
    )
    if unlabelled.any():
        clip = clips.loc[rows].loc[unlabelled.to_numpy(), CLIP_KEY].iloc[0].tolist()
        raise ValueError(
            f"the weight search needs labels and domains of the development test clips; {int(unlabelled.sum())} "
            f"are unknown (e.g. {clip})"
        )
    return rows


def search_weights(
    systems: Mapping[str, pd.DataFrame],
    n_iter: int = 40,
    init_points: int = 10,
    seed: int = 0,
    objective: Callable[[pd.DataFrame], float] | None = None,
    normalise_by: str | None = "train",
    progress: bool = True,
) -> tuple[dict[str, float], float, pd.DataFrame]:
    """Bayesian optimisation of the fusion weights on the development test clips.

    Each weight ranges over [0, 1]. The search first evaluates every system alone and the equal mix
    (so the result is never worse on the objective than the best single system or the plain mean),
    then ``init_points`` random weight vectors (seeded), then ``n_iter`` points proposed by the
    Gaussian-process optimiser. ``objective(fused_scores) -> float`` is maximised over the fused
    scores of the labelled development test clips; default: the official score.

    Returns ``(weights, best objective, history)``: the best weights normalised to sum 1, the
    objective they reach, and one history row per evaluation (``step``, ``phase``, the normalised
    weights, ``objective``).
    """
    for name, value in (("n_iter", n_iter), ("init_points", init_points)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    clashing = sorted({"step", "phase", "objective"} & set(systems))
    if clashing:
        raise ValueError(f"system names {clashing} clash with the search history's columns; rename them")
    clips, matrix, names = _aligned(systems, normalise_by)
    rows = _development_test_rows(clips)
    evaluated_clips, evaluated = clips[rows].reset_index(drop=True), matrix[rows]
    official = _official_score_of_vectors(evaluated_clips) if objective is None else None
    parameter = {name: f"w{i}" for i, name in enumerate(names)}  # optimiser-safe keys, any system names
    history: list[dict] = []

    def evaluate(raw: Mapping[str, float], phase: str) -> float:
        vector = np.array([raw[parameter[name]] for name in names], dtype=float)
        vector = vector / vector.sum() if vector.sum() > 0 else np.full(len(names), 1.0 / len(names))
        fused = evaluated @ vector
        value = (
            official(fused) if objective is None else float(objective(evaluated_clips.assign(score=fused)))
        )
        if not math.isfinite(value):
            raise ValueError(f"the objective returned {value} for weights {dict(zip(names, vector))}")
        history.append({"step": len(history), "phase": phase, **dict(zip(names, vector)), "objective": value})
        return value

    optimiser = BayesianOptimization(
        f=None,
        pbounds={parameter[name]: (0.0, 1.0) for name in names},
        acquisition_function=_FewRestartsUCB(restarts=3, random_state=seed),
        random_state=seed,
        verbose=0,
        allow_duplicate_points=True,
    )
    rng = np.random.default_rng(seed)
    starts = [("single", np.eye(len(names))[i]) for i in range(len(names))] + [("mean", np.ones(len(names)))]
    starts += [("random", rng.random(len(names))) for _ in range(init_points)]
    bar = tqdm(total=len(starts) + n_iter, desc="fusion weights", disable=not progress)
    for phase, vector in starts:
        point = {parameter[name]: float(v) for name, v in zip(names, vector)}
        optimiser.register(params=point, target=evaluate(point, phase))
        bar.update()
    for _ in range(n_iter):
        point = optimiser.suggest()
        optimiser.register(params=point, target=evaluate(point, "bayes"))
        bar.update()
    bar.close()

    table = pd.DataFrame(history)
    best = table.loc[table["objective"].idxmax()]
    return {name: float(best[name]) for name in names}, float(best["objective"]), table


# --------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------
def _validated_weights(weights, source: str) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{source}: fusion weights must be a non-empty mapping of system name -> weight")
    clean = {}
    for name, value in weights.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: weight {name!r}: {value!r} is not a system name with a number")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{source}: weight of {name!r} must be finite and non-negative, got {value}")
        clean[name] = float(value)
    return clean


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"weights file {path} must end in .json, .yaml or .yml")


def save_weights(weights: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Write fusion weights to ``path`` (.json or .yaml/.yml by suffix), atomically."""
    path = Path(path)
    kind = _format(path)
    weights = _validated_weights(dict(weights), str(path))
    text = (
        json.dumps(weights, indent=2) + "\n" if kind == "json" else yaml.safe_dump(weights, sort_keys=False)
    )
    return write_text_atomic(path, text)


def load_weights(path: str | os.PathLike) -> dict[str, float]:
    """Read fusion weights written by ``save_weights`` (or by hand): system name -> weight."""
    path = Path(path)
    kind = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        weights = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"weights file {path} is not valid {kind}: {error}") from error
    return _validated_weights(weights, str(path))


# --------------------------------------------------------------------------------------------------
# An honest estimate of the searched fusion
# --------------------------------------------------------------------------------------------------
def _half_folds(clips: pd.DataFrame, rows: np.ndarray, seed: int) -> np.ndarray:
    """Fold 0/1 for the development test rows: halves drawn within each (machine, section, domain,
    label) cell, so both halves hold every kind of clip."""
    folds = np.full(len(clips), -1)
    rng = np.random.default_rng(seed)
    test = clips[rows]
    for _, cell in test.groupby(["machine", "section", "domain", "label"], sort=True):
        order = rng.permutation(cell.index.to_numpy())
        folds[order] = (np.arange(len(order)) + rng.integers(2)) % 2  # alternate from a random fold
    return folds


def held_out_fusion(
    systems: Mapping[str, pd.DataFrame],
    *,
    folds: str = "auto",
    n_iter: int = 40,
    init_points: int = 10,
    seed: int = 0,
    normalise_by: str | None = "train",
    progress: bool = True,
) -> tuple[pd.DataFrame, list[dict[str, float]]]:
    """The Bayesian fusion as it would score clips it was not fitted on: every development test clip
    is fused with weights searched on the other folds' labels only (a machine's training clips, scored
    for the decision thresholds, with its test clips' weights). ``folds``: ``"machine"``
    (leave one machine type out), ``"half"`` (two halves of the test clips, drawn per machine, domain
    and label: for a single machine type), or ``"auto"`` (machines when there are two or more).

    Returns the fused scores (same rows as ``fuse``) and the weights of each fold. The official score of
    these scores estimates the searched fusion's score on new data; the score of ``search_weights``
    itself is fitted on the labels it is measured on."""
    clips, _, names = _aligned(systems, None)
    rows = _development_test_rows(clips)
    machines = sorted(clips.loc[rows, "machine"].unique())
    if folds == "auto":
        folds = "machine" if len(machines) >= 2 else "half"
    if folds == "machine":
        if len(machines) < 2:
            raise ValueError(
                "leave-one-machine-out needs two or more development machine types; use folds='half'"
            )
        # a machine's training clips (scored for thresholds, never labelled) follow its test clips
        in_dev = (clips["dataset"] == "dev").to_numpy()
        fold_of = np.where(
            in_dev, clips["machine"].map({m: i for i, m in enumerate(machines)}).fillna(-1), -1
        )
        fold_of = fold_of.astype(int)
    elif folds == "half":
        fold_of = _half_folds(clips, rows, seed)
        fold_of[(clips["split"] == "train").to_numpy() & (clips["dataset"] == "dev").to_numpy()] = 0
    else:
        raise ValueError(f"folds must be 'auto', 'machine' or 'half', got {folds!r}")
    fused = fuse(systems, "mean", normalise_by=normalise_by).reset_index(drop=True)
    key = pd.MultiIndex.from_frame(clips[CLIP_KEY])
    weights_per_fold = []
    for fold in sorted(set(fold_of[rows].tolist())):
        held = pd.MultiIndex.from_frame(clips.loc[(fold_of == fold) & rows, CLIP_KEY])  # its labelled clips
        if (rows & (fold_of != fold)).sum() == 0:
            raise ValueError(
                f"fold {fold} holds every labelled development test clip: nothing left to fit on"
            )
        fit = {
            name: frame[~pd.MultiIndex.from_frame(frame[CLIP_KEY]).isin(held)]
            for name, frame in systems.items()
        }
        weights, _, _ = search_weights(
            fit,
            n_iter=n_iter,
            init_points=init_points,
            seed=seed,
            normalise_by=normalise_by,
            progress=progress,
        )
        weights_per_fold.append(weights)
        scored = fuse(systems, weights, normalise_by=normalise_by).set_index(CLIP_KEY)["score"]
        in_fold = fold_of == fold
        fused.loc[in_fold, "score"] = scored.reindex(key[in_fold]).to_numpy()
    return fused, weights_per_fold


# --------------------------------------------------------------------------------------------------
# The fusion step of a run (notebook 10)
# --------------------------------------------------------------------------------------------------
FUSION_RULES = ("bayes",) + LABEL_FREE_RULES


def fuse_systems(
    to_fuse: Mapping[str, pd.DataFrame],
    rule: str,
    *,
    normalise_by: str | None = "train",
    bayes_iter: int = 40,
    bayes_init: int = 10,
    seed: int = 0,
    heldout_estimate: bool = True,
    progress: bool = True,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Everything a run's fusion step adds: ``({"fusion": ..., ...}, record)``.

    ``fusion`` is ``rule`` applied to ``to_fuse``: ``"bayes"`` (weights searched on the development
    labels), or a label-free rule (``LABEL_FREE_RULES``). Beside any other rule the label-free
    ``fusion-mean`` is added, so a fitted or weighted fusion is always read against the plain mean; with
    ``"bayes"`` and ``heldout_estimate``, ``fusion-heldout`` too (every clip fused with weights searched
    without its labels), left out with a note when the clips are too few to split. ``record`` holds
    the rule, the systems, the weights (Bayesian: one dict; agreement: one per section) and notes."""
    if rule not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {rule!r}: expected one of {FUSION_RULES}")
    record = {"rule": rule, "systems": list(to_fuse), "normalisation": normalise_by, "weights": None}
    systems = {}
    if rule == "bayes":
        weights, best, _ = search_weights(
            to_fuse,
            n_iter=bayes_iter,
            init_points=bayes_init,
            seed=seed,
            normalise_by=normalise_by,
            progress=progress,
        )
        record |= {"weights": weights, "searched_objective": best}
        systems["fusion"] = fuse(to_fuse, weights, normalise_by=normalise_by)
    else:
        systems["fusion"] = fuse(to_fuse, rule, normalise_by=normalise_by)
        if rule == "agreement":
            clips, matrix, names = _aligned(to_fuse, normalise_by)
            table = agreement_weights(clips, matrix).rename(columns={f"w{i}": n for i, n in enumerate(names)})
            record["weights"] = table.to_dict(orient="records")
    if rule != "mean":
        systems["fusion-mean"] = fuse(to_fuse, "mean", normalise_by=normalise_by)
    if rule == "bayes" and heldout_estimate:
        try:
            systems["fusion-heldout"], _ = held_out_fusion(
                to_fuse,
                n_iter=bayes_iter,
                init_points=bayes_init,
                seed=seed,
                normalise_by=normalise_by,
                progress=progress,
            )
        except (
            ValueError
        ) as error:  # too few development clips to split: the estimate is left out, not the run
            record["note"] = f"no held-out estimate of the fusion: {error}"
    return systems, record
