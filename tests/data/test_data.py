"""Data loading: IDX reader on synthetic files of any size, the real MNIST split, helpers."""

import gzip
import hashlib
import struct
from pathlib import Path

import mnist1d  # noqa: F401  (a required dependency: a missing install fails here)
import numpy as np
import pytest
import torch
from hypothesis import settings
from realdata import MNIST_ENV, REAL_MNIST, mnist_dir, needs_real_mnist

from gnrev_plugin import data

pytest_plugins = ["pytester"]



def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim]) + b"".join(struct.pack(">i", s)
                                                                 for s in arr.shape)
    raw = head + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def make_dir(tmp: Path, n_train: int | None, n_test: int, hw=(28, 28), gz=True, seed=0):
    rng = np.random.default_rng(seed)
    sfx = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if n is None:
            continue
        x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(tmp / f"{prefix}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(tmp / f"{prefix}-labels-idx1-ubyte{sfx}", y, gz)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("hw", [(28, 28), (7, 5), (16, 16)])
def test_idx_roundtrip_any_size(tmp_path, gz, hw):
    arrays = make_dir(tmp_path, 30, 20, hw=hw, gz=gz)
    ds = data.load_idx_dataset(tmp_path, normalization="none")
    x_tr, y_tr = arrays["train"]
    x_te, y_te = arrays["t10k"]
    assert ds.in_features == hw[0] * hw[1]
    np.testing.assert_array_equal(ds.x_train.numpy(), x_tr.reshape(30, -1) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train.numpy(), y_tr)
    np.testing.assert_array_equal(ds.x_test.numpy(), x_te.reshape(20, -1) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test.numpy(), y_te)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64


def test_read_idx_other_dtypes(tmp_path):
    a = (np.arange(24).reshape(2, 3, 4) / 7).astype(">f4")
    write_idx(tmp_path / "a.idx", a, gz=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.idx"), a)
    b = np.arange(-5, 5, dtype=">i4")
    write_idx(tmp_path / "b.idx.gz", b, gz=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.idx.gz"), b)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short")


def test_t10k_only_is_split(tmp_path):
    arrays = make_dir(tmp_path, None, 50, hw=(4, 6))
    ds = data.load_idx_dataset(tmp_path, normalization="none")
    x, y = arrays["t10k"]
    assert len(ds.y_train) == 40 and len(ds.y_test) == 10  # 80 % / 20 %
    np.testing.assert_array_equal(ds.y_train.numpy(), y[:40])
    np.testing.assert_array_equal(ds.y_test.numpy(), y[40:])
    ds2 = data.load_idx_dataset(tmp_path, train_size=30, test_size=5, normalization="none")
    np.testing.assert_array_equal(ds2.y_train.numpy(), y[:30])
    np.testing.assert_array_equal(ds2.y_test.numpy(), y[45:])
    with pytest.raises(ValueError, match="cannot split"):
        data.load_idx_dataset(tmp_path, train_size=45, test_size=10)


def test_dot_separated_names(tmp_path):
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", rng.integers(0, 255, (10, 2, 2), np.uint8),
              gz=False)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", np.arange(10, dtype=np.uint8), gz=False)
    ds = data.load_idx_dataset(tmp_path)
    assert len(ds.y_train) + len(ds.y_test) == 10


def test_missing_dir_names_expected_files(tmp_path):
    for where in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            data.load_dataset("mnist", data_dir=where)
        msg = str(err.value)
        assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
        assert str(where) in msg


def test_incomplete_pair_is_named(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 2, 2), np.uint8), gz=True)
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        data.load_idx_dataset(tmp_path)


def test_env_var_overrides_default(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_normalisations(tmp_path):
    make_dir(tmp_path, 40, 10, hw=(3, 3))
    raw = data.load_idx_dataset(tmp_path, normalization="none")
    mn = data.load_idx_dataset(tmp_path, normalization="mnist")
    torch.testing.assert_close(mn.x_train, (raw.x_train - 0.1307) / 0.3081)
    st = data.load_idx_dataset(tmp_path, normalization="standardize")
    assert abs(float(st.x_train.mean())) < 1e-5 and abs(float(st.x_train.std()) - 1) < 1e-2
    torch.testing.assert_close(st.x_test, (raw.x_test - raw.x_train.mean())
                               / raw.x_train.std(unbiased=False))
    with pytest.raises(ValueError, match="normalization"):
        data.load_idx_dataset(tmp_path, normalization="zscore")


@needs_real_mnist
def test_real_mnist_split_matches_its_readme():
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        md5 = hashlib.md5(gzip.open(REAL_MNIST / name).read()).hexdigest()
        assert md5 == {"t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
                       "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637"}[name]
    ds = data.load_dataset("mnist", data_dir=REAL_MNIST)
    assert (len(ds.y_train), len(ds.y_test), ds.in_features, ds.num_classes) == (8000, 2000,
                                                                                 784, 10)
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    pix = torch.cat([ds.x_train, ds.x_test]) * data.MNIST_STD + data.MNIST_MEAN
    assert abs(float(pix.mean()) - 0.1325) < 5e-4 and abs(float(pix.std()) - 0.3105) < 5e-4
    fb = data.full_batch_subset(ds, 1024)
    assert torch.equal(fb.x_train, ds.x_train[:1024]) and torch.equal(fb.x_test, ds.x_test)


def test_full_batch_subset_too_large():
    ds = data.teacher_student(n_train=10, n_test=5)
    with pytest.raises(ValueError, match="only 10"):
        data.full_batch_subset(ds, 11)


def test_one_hot_and_errors():
    y = torch.tensor([0, 2, 1, 2])
    oh = data.one_hot(y, 3)
    assert torch.equal(oh.argmax(1), y) and torch.equal(oh.sum(1), torch.ones(4))
    with pytest.raises(ValueError):
        data.one_hot(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError):
        data.one_hot(torch.tensor([0.0, 1.0]), 3)


def test_pad_to_even():
    ds = data.teacher_student(n_train=6, n_test=3, in_features=5)
    p = data.pad_to_even(ds)
    assert p.in_features == 6 and torch.equal(p.x_train[:, :5], ds.x_train)
    assert torch.all(p.x_train[:, 5] == 0) and data.pad_to_even(p) is p


def test_teacher_student_deterministic_and_learnable_labels():
    a, b = data.teacher_student(seed=3), data.teacher_student(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, data.teacher_student(seed=4).x_train)
    assert len(torch.unique(a.y_train)) >= 5  # not a degenerate one-class task


def test_epoch_batches_cover_everything_and_depend_only_on_seed_epoch():
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    batches = list(data.minibatches(x, y, 5, seed=1, epoch=2))
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(23))
    again = list(data.minibatches(x, y, 5, seed=1, epoch=2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    other = torch.cat([b[1] for b in data.minibatches(x, y, 5, seed=1, epoch=3)])
    assert not torch.equal(other, torch.cat([b[1] for b in batches]))
    assert [len(b[1]) for b in data.minibatches(x, y, 5, 1, 0, drop_last=True)] == [5] * 4


def test_mnist1d_offline():
    state = np.random.get_state()
    ds = data.load_dataset("mnist1d", num_samples=500)
    assert (len(ds.y_train), len(ds.y_test), ds.in_features, ds.num_classes) == (400, 100, 40, 10)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG left untouched
    assert torch.equal(ds.x_train, data.load_dataset("mnist1d", num_samples=500).x_train)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar100")


def test_mnist_dir_env_override(monkeypatch, tmp_path):
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
    monkeypatch.delenv(MNIST_ENV, raising=False)
    assert mnist_dir() == default
    monkeypatch.setenv(MNIST_ENV, str(tmp_path))
    assert mnist_dir() == tmp_path.resolve()


CI_SKIP_PROBE = '''
import pytest

def test_needs_data():
    pytest.skip("the data set is not at /nowhere")

def test_needs_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''


@pytest.mark.parametrize("ci", [True, False])
def test_ci_turns_a_missing_data_skip_into_a_failure(pytester, monkeypatch, ci):
    """Runs the real tests/conftest.py on a probe module (bug it catches: a host or data set
    missing under CI skips silently)."""
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(CI_SKIP_PROBE)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    profile = settings.get_current_profile_name()   # the probe's conftest loads its own
    try:
        res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    finally:
        settings.load_profile(profile)
    if ci:
        res.assert_outcomes(failed=1, skipped=1, xfailed=1)
        res.stdout.fnmatch_lines(["*skipped under CI*the data set is not at /nowhere*"])
    else:
        res.assert_outcomes(skipped=2, xfailed=1)
