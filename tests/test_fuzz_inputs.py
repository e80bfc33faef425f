"""Fuzz tests (Hypothesis, issue 22): no input produces a traceback. The CLI's ``K=V`` options end
in success or a one-line ``gnrev train: error:`` with a non-zero status; run specs, IDX files and
plugin registrations raise only named exceptions (``ValueError``/:class:`DataError`,
:class:`PluginError`). Each test stays well under 30 s (the repo's profiles, tests/conftest.py:
``ci`` derandomised, ``thorough`` for long explorations)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import string
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gnrev_plugin.build import RunSpec
from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.data import DataError, read_idx
from gnrev_plugin.registry import PluginError, Registry, discover, get_registry, hookimpl

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# ---------------------------------------------------------------------------------- K=V options
KEYS = {  # the real option names of the entries the fuzzed runs use, plus random ones
    "--opt": ["lr", "solver", "damping", "rtol", "atol", "rank_rtol", "gram_dtype", "factor_dtype",
              "ce_target", "ce_damping", "step_convention", "weight_decay", "rank_policy"],
    "--model-opt": ["hidden", "num_blocks", "activation", "linear_first_block", "init_std",
                    "proj_gain", "dtype"],
    "--data-opt": ["n_train", "n_test", "in_features", "num_classes", "teacher_hidden", "seed"],
}
_VALUES = st.one_of(
    st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(), st.none(), st.lists(st.integers(-2, 6), max_size=3),
    st.sampled_from(["float32", "float64", "relu", "eigh", "warn", "identity", "x", "{}"]))
_KEY_TEXT = st.text(string.ascii_letters + "_", min_size=1, max_size=8)


@st.composite
def kv_options(draw):
    args = []
    for flag, keys in KEYS.items():
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(keys) | _KEY_TEXT)
            raw = draw(_VALUES.map(json.dumps) | st.text(string.printable.strip(), max_size=6))
            args += [flag, f"{key}={raw}"]
    return args


BASE = ["train", "--data", "teacher-student", "--data-opt", "n_train=12", "--data-opt",
        "n_test=6", "--model-opt", "hidden=8", "--epochs", "0", "--batch-size", "6",
        "--probe-size", "4", "--no-progress"]


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        code = gnrev_main([*argv, "--out", str(Path(tmp) / "run")])
    return code, err.getvalue()


def test_cli_unknown_option_key_lists_the_valid_keys():
    code, err = run_cli([*BASE, "--opt", "bogus=1"])
    assert code != 0 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("gnrev train: error: optimizer 'gnrev.exact_gn' rejected its options")
    assert "unknown ['bogus']; valid options: lr, solver, damping" in line


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=50, **FAST)
@given(kv_options())
@example(["--model-opt", "dtype=\"x\""])     # found: a RuntimeError from torch escaped
@example(["--data-opt", "seed=\"x\""])       # found: a RuntimeError from manual_seed escaped
@example(["--model-opt", "width=7"])
def test_cli_kv_options_never_give_a_traceback(extra):
    code, err = run_cli([*BASE, *extra])      # an escaping exception fails the test here
    assert "Traceback" not in err
    if code != 0:
        errors = [x for x in err.splitlines() if "error:" in x]
        assert len(errors) == 1 and errors[0].startswith("gnrev train: error: "), err


# ---------------------------------------------------------------------------------- run specs
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(width=32)
                     | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_FIELDS = ["model", "model_kwargs", "optimizer", "optimizer_kwargs", "loss", "dataset",
           "dataset_kwargs", "metrics", "seed", "device", "epochs", "batch_size", "probe_size"]


@settings(max_examples=150, **FAST)
@given(st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _JSON, max_size=6)
       | _JSON)
def test_run_specs_from_json_raise_only_named_errors(obj):
    """What ``config.json`` may hold (read on resume and by ``gnrev report``): a spec or a
    ``ValueError``; resolving it against the registry: a spec, ``ValueError`` or ``PluginError``."""
    try:
        spec = RunSpec.from_dict(obj)
    except ValueError:
        return
    try:
        spec.resolve(get_registry())
    except (ValueError, PluginError):
        pass


# ---------------------------------------------------------------------------------- IDX files
@st.composite
def idx_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))                        # random bytes
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x01, 0xFF]))
    magic = bytes([0, 0, code] if draw(st.booleans()) else draw(st.binary(min_size=3, max_size=3)))
    dims = draw(st.lists(st.integers(0, 6) | st.sampled_from([2**31 - 1, 2**32 - 1]), max_size=4))
    head = magic + bytes([len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    raw = head + draw(st.binary(max_size=200))
    return raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw   # truncated?


@settings(max_examples=200, **FAST)
@given(idx_bytes(), st.sampled_from(["plain", "gz", "gz-truncated"]))
@example(b"\x00\x00\x0c\x03" + b"\x00" * 4 + b"\x7f\xff\xff\xff" * 2, "plain")  # found: 0 × 2³¹ × 2³¹
@example(b"\x00\x00\x08\x01\x00\x00\x00\x04abc", "gz-truncated")
def test_idx_readers_raise_only_data_errors(raw, form):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("t10k-images-idx3-ubyte" + ("" if form == "plain" else ".gz"))
        if form == "plain":
            path.write_bytes(raw)
        else:
            packed = gzip.compress(raw)
            path.write_bytes(packed if form == "gz" else packed[:len(packed) // 2])
        try:
            arr = read_idx(path)
        except DataError as err:
            assert str(path) in str(err)
            return
    assert arr.nbytes == len(raw) - 4 - 4 * raw[3]              # exactly what the header says


# ---------------------------------------------------------------------------------- plugins
_FIELD_VALUES = st.none() | st.integers(-2, 3) | st.booleans() | st.text(max_size=6) \
    | st.lists(st.text(max_size=6), max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                  st.integers(), max_size=2)
_FACTORIES = {"model": lambda *, in_features, num_classes: None, "optimizer": lambda params: None,
              "metric": lambda model, **kw: 0.0, "dataset": lambda **kw: None}


@st.composite
def registrations(draw):
    kind = draw(st.sampled_from(list(_FACTORIES)))
    fields = draw(st.fixed_dictionaries({}, optional={
        "defaults": _FIELD_VALUES, "needs": _FIELD_VALUES | st.lists(
            st.sampled_from(["model", "loss", "data"]), max_size=2),
        "protocol": _FIELD_VALUES | st.sampled_from(["run", "function"]),
        "input_multiple": _FIELD_VALUES, "tags": _FIELD_VALUES}))
    return kind, draw(st.text(max_size=10) | st.integers()), fields


@settings(max_examples=200, **FAST)
@given(st.lists(registrations(), min_size=1, max_size=4))
def test_plugin_registrations_raise_only_plugin_errors(regs):
    reg = Registry()
    for kind, name, fields in regs:
        try:
            entry = reg.add(kind, name, _FACTORIES[kind], **fields)
        except PluginError:
            continue
        assert reg.entry(kind, name) is entry

    plugin = type("FuzzPlugin", (), {})          # the same through discovery: reported, skipped

    @hookimpl
    def gnrev_register_models(registry):
        for kind, name, fields in regs:
            registry.add(kind, name, _FACTORIES[kind], **fields)

    plugin.gnrev_register_models = staticmethod(gnrev_register_models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = discover(entry_points=[], extra_plugins=[("fuzz", plugin)])
    assert len(found.problems) <= 1

