"""Shared test settings: float64 oracles and a bounded thread count on the 2-core CI machine,
Hypothesis profiles, the real-data location, and CI's "nothing skips silently" rule.

Hypothesis profiles (``docs/testing.md``):

* ``ci`` (loaded when ``CI`` is set): derandomised, the same examples every run;
* ``dev`` (the default elsewhere): random exploration with each test's own ``max_examples``;
* ``thorough`` (``--hypothesis-profile=thorough``): a long exploration, every property test runs
  at least ``THOROUGH_EXAMPLES`` examples (overriding the per-test ``max_examples``).

Under ``CI`` a skipped test is a failure unless its reason names a missing GPU: a missing host
package or data set must not pass silently.
"""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

import os  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

THOROUGH_EXAMPLES = int(os.environ.get("GNREV_THOROUGH_EXAMPLES", "400"))

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("thorough", deadline=None, print_blob=True,
                          max_examples=THOROUGH_EXAMPLES,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: Shared fixtures: ``toy_registry`` (the repo's toy plugin installed on sys.path); the session's
#: temporary HOME and its end-of-session check (``home_guard``).
pytest_plugins = ["toy_plugin", "home_guard"]


@pytest.fixture(autouse=True)
def _gnrev_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every test's gnrev cache (benchopt solver files) lives in its own temporary folder."""
    monkeypatch.setenv("GNREV_CACHE_DIR", str(tmp_path_factory.mktemp("gnrev-cache")))

#: A skip under CI is allowed only for a test that truly needs a missing GPU.
GPU_SKIP = re.compile(r"\b(gpu|cuda)\b", re.IGNORECASE)


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda``-marked tests (with the reason) when no GPU is present; under the
    ``thorough`` profile, raise every property test's ``max_examples``."""
    if not torch.cuda.is_available():
        no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(no_gpu)
    if settings.get_current_profile_name() != "thorough":
        return
    for item in items:
        fn = getattr(item, "obj", None)
        inner = getattr(fn, "_hypothesis_internal_use_settings", None)
        if inner is not None and inner.max_examples < THOROUGH_EXAMPLES:
            fn._hypothesis_internal_use_settings = settings(inner, max_examples=THOROUGH_EXAMPLES)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip_under_ci(report) -> None:
    if not (os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = _skip_reason(report)
    if GPU_SKIP.search(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI, which must run every host and data set: {reason}\n"
                       "(install the missing package or data, or set GNREV_MNIST_DIR; only a "
                       "missing GPU may skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())
