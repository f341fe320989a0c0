"""Shared test fixtures.

Tests that need the project's reference material (official-format checkpoints with the authors'
outputs, the organisers' evaluator results, real MIMII recordings) read it from ``../shared`` beside
the checkout, or from ``$DCASE_SHARED``. A user's clone has none of it: those tests skip with a
message that says so. CI (``.ci/run``) refuses to start without it, so there they always run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCASE_SHARED", REPO.parent / "shared"))


def _shared_subdir(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"reference material not found at {path}: these tests need the project's shared/ folder "
            "beside the checkout (or DCASE_SHARED pointing at it)"
        )
    return path


@pytest.fixture(scope="session")
def backbone_fixtures() -> Path:
    """``shared/fixtures/backbones``: official-format checkpoints and the authors' outputs."""
    return _shared_subdir("fixtures", "backbones")


@pytest.fixture(scope="session")
def audio(backbone_fixtures) -> dict:
    """The fixture waveforms ``a`` (2.0 s) and ``b`` (1.6 s) of ``audio.npz`` as float32 tensors."""
    import numpy as np

    data = np.load(backbone_fixtures / "audio.npz")
    return {name: torch.from_numpy(data[name]) for name in ("a", "b")}


@pytest.fixture(scope="session")
def metric_fixtures() -> Path:
    """``shared/fixtures/metrics``: the organisers' evaluator run on real 2024 ground truth."""
    return _shared_subdir("fixtures", "metrics")


@pytest.fixture(scope="session")
def mimii_sample() -> Path:
    """``shared/data/mimii_sample``: real MIMII machine recordings (mono, 16 kHz, 10 s)."""
    return _shared_subdir("data", "mimii_sample")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are small: intra-op threads only add contention on a 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
