"""The Hypothesis profiles of tests/conftest.py do what docs/testing.md says (run on a probe
module with the real conftest): ``thorough`` raises every property test's example count, the
default keeps each test's own ``max_examples``, ``ci`` is derandomised."""

from pathlib import Path

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]

PROBE = '''
import json, os
from hypothesis import given, settings, strategies as st

SEEN = []

@settings(max_examples=5, database=None)
@given(st.integers(0, 10**9))
def test_probe(x):
    SEEN.append(x)

def test_report():
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({"n": len(SEEN), "values": SEEN,
                   "profile": __import__("hypothesis").settings.get_current_profile_name()}, f)
'''


def run_probe(pytester, monkeypatch, tmp_path, *args, ci=False):
    import json

    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_probe=PROBE)
    out = tmp_path / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(out))
    monkeypatch.setenv("GNREV_THOROUGH_EXAMPLES", "37")
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    profile = settings.get_current_profile_name()      # the probe's conftest loads its own
    try:
        res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)
    finally:
        settings.load_profile(profile)
    res.assert_outcomes(passed=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["dev", "thorough", "ci"])
def test_profiles(pytester, monkeypatch, tmp_path, mode):
    args = ["--hypothesis-profile=thorough"] if mode == "thorough" else []
    got = run_probe(pytester, monkeypatch, tmp_path, *args, ci=(mode == "ci"))
    assert got["profile"] == mode
    assert got["n"] == (37 if mode == "thorough" else 5)


def test_ci_profile_is_derandomised(pytester, monkeypatch, tmp_path):
    first = run_probe(pytester, monkeypatch, tmp_path, ci=True)["values"]
    second = run_probe(pytester, monkeypatch, tmp_path, ci=True)["values"]
    assert first == second
