"""Shared test setup: float32 on CPU, one thread, fixture locations.

Parity fixtures (tiny official models with random weights and their recorded outputs) are read from the
full set when there is one (``$VISAR_FIXTURES``, else ``../shared/fixtures`` beside the repository), else
from the subset shipped in ``tests/fixtures`` (the smallest model of each family), so a fresh clone runs
the parity tests too. Tests that need files outside the subset carry ``@pytest.mark.fixtures`` and skip
without the full set; ``VISAR_FIXTURES=tests/fixtures`` runs the suite as a fresh clone would.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: the subset of the official-format fixtures shipped in the repository (tests/fixtures/README.md)
SUBSET = Path(__file__).resolve().parent / "fixtures"


def _full_set() -> Path | None:
    """The full fixture set: ``$VISAR_FIXTURES``, else ``../shared/fixtures`` beside the repository; ``None`` when
    neither is a folder (or ``$VISAR_FIXTURES`` names the shipped subset, which simulates a fresh clone)."""
    env = os.environ.get("VISAR_FIXTURES")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    for cand in ([Path(env).expanduser()] if env else []) + [shared]:
        if cand.is_dir():
            return None if cand.resolve() == SUBSET else cand
    return None


FULL = _full_set()
#: where fixtures are read from: the full set when present, else the shipped subset
FIXTURES = FULL if FULL is not None else SUBSET


def fixture_dir(family: str) -> Path:
    """Folder of a family's parity fixtures (the full set when present, else the repository's subset);
    skips the test with a reason when the family has none there."""
    d = FIXTURES / family
    if not d.is_dir():
        pytest.skip(f"parity fixtures of {family} not found at {d} (the full set lives in ../shared/fixtures beside "
                    "the repository; set VISAR_FIXTURES to point elsewhere)")
    return d


@pytest.fixture
def fixtures():
    return fixture_dir


def pytest_report_header(config):
    env = os.environ.get("VISAR_FIXTURES")
    note = f" (VISAR_FIXTURES={env} is not a folder)" if env and not Path(env).expanduser().is_dir() else ""
    if FULL is not None:
        return f"visar parity fixtures: full set at {FULL}{note}"
    return f"visar parity fixtures: the shipped subset at {SUBSET}{note}; tests marked 'fixtures' skip"


def pytest_runtest_setup(item):
    """Tests marked ``fixtures`` read files outside the shipped subset: without the full set they skip, with
    the reason."""
    if item.get_closest_marker("fixtures") is not None and FULL is None:
        pytest.skip("needs the full fixture set (set VISAR_FIXTURES=/path/to/fixtures, or place it at "
                    "../shared/fixtures); this clone has the subset in tests/fixtures")
