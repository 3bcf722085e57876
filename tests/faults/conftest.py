"""Fixtures of the fault suite: good inputs to spoil, built once per session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit import SYNTH, plan_obj  # noqa: E402

from vlmopt.data import synthvqa  # noqa: E402

N_CASES: list[int] = []


def pytest_collection_modifyitems(items):
    N_CASES.append(sum(1 for i in items if i.originalname == "test_bad_input_is_one_error_line"))


def pytest_terminal_summary(terminalreporter):
    if N_CASES and N_CASES[-1]:
        terminalreporter.write_line(f"fault suite: {N_CASES[-1]} cases")


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def good_data(fault_root) -> Path:
    """data.jsonl of 3 SynthVQA records (seed 7); cases copy it before spoiling it."""
    return synthvqa.write_dataset(fault_root / "good", 3, seed=7)


@pytest.fixture(scope="session")
def synth_fingerprint() -> str:
    from vlmopt.frontend.load import fingerprint, resolve_model

    return fingerprint(resolve_model(SYNTH))


@pytest.fixture(scope="session")
def good_plan(fault_root, synth_fingerprint) -> Path:
    """An identity plan for builtin:synth-llava."""
    p = fault_root / "identity-plan.json"
    p.write_text(json.dumps(plan_obj(SYNTH, synth_fingerprint)))
    return p


@pytest.fixture(scope="session")
def fault_artifact(fault_root, tiny_llava, good_data) -> Path:
    """One artifact written by ``vlmopt apply`` (identity plan, the tiny LLaVA of
    tests/conftest.py: the export is the slow part, ~30 s), shared by every ``run`` case;
    cases spoil copies of it."""
    from vlmopt.cli import main
    from vlmopt.frontend.load import fingerprint

    plan = fault_root / "tiny-plan.json"
    plan.write_text(json.dumps(plan_obj(str(tiny_llava), fingerprint(tiny_llava))))
    out = fault_root / "artifact"
    assert main(["apply", str(plan), str(tiny_llava), "--out", str(out), "--calib",
                 str(good_data)]) == 0
    return out


