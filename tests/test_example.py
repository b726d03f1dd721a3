"""The README's main command, examples/guard_smollm2.py, end to end on a tiny random Llama (--tiny)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "guard_smollm2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("guard_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("example") / "bundles"
    try:
        code = example.main(["--tiny", "--out", str(out), "--new-tokens", "4"])
    finally:
        torch.set_num_threads(n)
    return code, out


def test_example_certifies_both_policies(run):
    code, out = run
    assert code == 0
    for name in ("clinical", "prompt_injection"):
        cert = json.loads((out / name / "certificate.json").read_text())
        assert cert["verdict"] == "PROVED"
        assert cert["leak_test"]["leakage_rate"]["guarded"] == 0.0
        assert cert["leak_test"]["leakage_rate"]["dense"] > 0.0
        assert cert["audit"]["clean"] is True


def test_bundles_written_by_the_example_load(run):
    from domainguard.bundle import load_certified
    from domainguard.guard import guard_state

    _, out = run
    model = load_certified(out / "clinical")
    assert guard_state(model).compiled.policy.name == "clinical-assistant"


def test_example_prints_a_summary(example, tmp_path, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = example.main(["--tiny", "--out", str(tmp_path / "b"), "--scenarios", "prompt_injection",
                             "--new-tokens", "2"])
    finally:
        torch.set_num_threads(n)
    text = capsys.readouterr().out
    assert code == 0
    for needle in ("graph audit", "(a) leak test", "(b) next-token loss", "(c) guarded", "certified:", "== summary =="):
        assert needle in text, needle
    assert "'planner' logits with the attack: guarded identical (bitwise); dense changed" in text
    # (b): leaving the forbidden segment out moves the guarded loss by rounding only, the dense one by far more.
    m = re.search(r"\(b\) .*: guarded \S+ vs \S+ \(\|Δ\| (\S+)\); dense \S+ vs \S+ \(\|Δ\| (\S+)\)", text)
    assert m, text
    guarded, dense = float(m.group(1)), float(m.group(2))
    assert guarded < 1e-5 and dense > 100 * max(guarded, 1e-9), (guarded, dense)


def test_attack_text_keeps_the_layout(example):
    tok = example.WordTokenizer()
    segs = [("a", "one two three"), ("b", "four five")]
    bad = example.attacked(segs, "a", "x y", tok)
    assert bad[1] == segs[1] and len(bad[0][1]) == 3
