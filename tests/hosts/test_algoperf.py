"""AlgoPerf adapter: the five submission functions drive any registered optimizer (by registry name)
through a fake workload that follows AlgoPerf's documented PyTorch ``model_fn`` / ``loss_fn``
contract; the optimizer state survives AlgoPerf's own checkpoint save/restore; every AlgoPerf
workload name has a batch size or a reason; DDP-wrapped models; export writes a loadable
submission bound to a registry name."""

from __future__ import annotations

import copy
import enum
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN
from gnrev_plugin.registry import get_registry

TOY = Path(__file__).resolve().parents[1] / "fixtures" / "gnrev_toy_plugin"

#: The workload names of AlgoPerf's registry, copied from ``algoperf/workloads/workloads.py``
#: (github.com/mlcommons/algorithmic-efficiency at commit 2c90454, 2025-09-05).
UPSTREAM_WORKLOADS = (
    "cifar criteo1tb criteo1tb_test criteo1tb_layernorm criteo1tb_embed_init criteo1tb_resnet "
    "fastmri fastmri_model_size fastmri_tanh fastmri_layernorm imagenet_resnet "
    "imagenet_resnet_silu imagenet_resnet_gelu imagenet_resnet_large_bn_init imagenet_vit "
    "imagenet_vit_glu imagenet_vit_post_ln imagenet_vit_map librispeech_conformer "
    "librispeech_conformer_attention_temperature librispeech_conformer_layernorm "
    "librispeech_conformer_gelu librispeech_deepspeech librispeech_deepspeech_tanh "
    "librispeech_deepspeech_no_resnet librispeech_deepspeech_norm_and_spec_aug mnist ogbg "
    "ogbg_gelu ogbg_silu ogbg_model_size wmt wmt_post_ln wmt_attention_temp wmt_glu_tanh"
).split()


class LossType(enum.Enum):  # AlgoPerf's spec.LossType (the names are what the adapter reads)
    SOFTMAX_CROSS_ENTROPY = 0
    SIGMOID_CROSS_ENTROPY = 1
    MEAN_SQUARED_ERROR = 2
    CTC_LOSS = 3


class FakeWorkload:
    """A classification workload with AlgoPerf's PyTorch contract (``mnist``-like)."""

    loss_type = LossType.SOFTMAX_CROSS_ENTROPY
    step_hint = 3

    def __init__(self):
        self.model_fn_calls = 0
        self.masks = []

    def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state, mode, rng,
                 update_batch_norm, dropout_rate=0.0):
        assert isinstance(params, nn.Module) and update_batch_norm is True
        self.model_fn_calls += 1
        train = mode == ap.ForwardPassMode.TRAIN
        params.train(train)
        with torch.set_grad_enabled(train):
            logits = params(augmented_and_preprocessed_input_batch["inputs"])
        return logits, model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        self.masks.append(mask_batch)
        per_example = F.cross_entropy(logits_batch, label_batch, reduction="none",
                                      label_smoothing=label_smoothing)
        if mask_batch is not None:
            per_example = per_example * mask_batch
            n_valid = mask_batch.sum()
        else:
            n_valid = torch.as_tensor(len(per_example))
        return {"summed": per_example.sum(), "n_valid_examples": n_valid,
                "per_example": per_example}


def _batches(seed, n_batches, n, d, classes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, classes, generator=gen, dtype=dtype)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, d, generator=gen, dtype=dtype)
        out.append({"inputs": x, "targets": (x @ teacher).argmax(1)})
    return out


def _mlp(d, classes, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, classes)).to(dtype)


def _revmlp(d, classes, seed=0):
    return RevMLP(d, hidden=24, num_blocks=2, num_classes=classes, linear_first_block=False,
                  init_std=0.1, seed=seed)


def _full_loss(model, batches):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(b["inputs"]), b["targets"])) for b in batches)


def _steps(workload, model, state, batches, hps, first_step=0):
    queue = iter(batches)
    for step in range(first_step, first_step + len(batches)):
        batch = ap.data_selection(workload, queue, state, model, None, hps, step, None)
        state, model, _ = ap.update_params(workload, model, None, None, hps, batch,
                                           LossType.SOFTMAX_CROSS_ENTROPY, state, [], step, None)
        state, model, _ = ap.prepare_for_eval(workload, model, None, None, hps,
                                              LossType.SOFTMAX_CROSS_ENTROPY, state, [], step,
                                              None)
    return state, model


def _train(workload, model, batches, hps, optimizer=ap.DEFAULT_OPTIMIZER):
    state = ap.init_optimizer_state(workload, model, None, hps, rng=None, optimizer=optimizer)
    return _steps(workload, model, state, batches, hps)


# ------------------------------------------------------------------ optimizers by registry name
@pytest.mark.parametrize("optimizer,kind,cls,lr", [
    ("dense_gn", "mlp", DenseGN, 0.5), ("gnrev.exact_gn", "revmlp", ExactGN, 0.5),
    ("gnrev.adam", "mlp", torch.optim.Adam, 0.05), ("sgd", "mlp", torch.optim.SGD, 0.5)])
def test_registered_optimizers_decrease_the_loss(optimizer, kind, cls, lr):
    d, c = 12, 4
    batches = _batches(0, 3, 10, d, c)
    model = _mlp(d, c) if kind == "mlp" else _revmlp(d, c)
    before = _full_loss(model, batches)
    workload = FakeWorkload()
    state, model = _train(workload, model, batches, {"learning_rate": lr}, optimizer)
    assert type(state["optimizer"]) is cls
    assert state["optimizer"].param_groups[0]["lr"] == lr  # AlgoPerf's learning_rate
    assert state["submission"].state_dict()["optimizer"] == get_registry().resolve_name(
        "optimizer", optimizer)
    assert workload.model_fn_calls == 3
    assert _full_loss(model, batches) < before


def test_default_is_dense_gn_with_the_registered_options_whatever_the_model():
    """No isinstance switch: a RevMLP gets DenseGN unless gnrev.exact_gn is named; the registry's
    defaults apply (the runners' rank policy), and without hyperparameters (self-tuning) the
    registered lr."""
    model = _revmlp(8, 3)
    state = ap.init_optimizer_state(FakeWorkload(), model, None, None, None)
    opt = state["optimizer"]
    assert type(opt) is DenseGN and opt.model is model
    defaults = get_registry().entry("optimizer", "gnrev.dense_gn").defaults
    assert opt.defaults["lr"] == defaults["lr"]
    assert opt.defaults["rank_policy"] == defaults["rank_policy"] == "warn"
    assert opt.defaults["loss"] == "cross_entropy"
    state = ap.init_optimizer_state(FakeWorkload(), model, None, {"learning_rate": 0.3}, None,
                                    optimizer="exact_gn", optimizer_kwargs={"damping": 1e-3,
                                                                            "solver": "damped"})
    assert type(state["optimizer"]) is ExactGN and state["optimizer"].defaults["lr"] == 0.3
    assert state["optimizer"].defaults["damping"] == 1e-3


def test_toy_plugin_optimizer_by_name(toy_registry):
    """A third-party optimizer through the same path: reference batch sizes, lr from AlgoPerf's
    hyperparameters, masked batches handed to the workload's loss_fn."""
    assert not ap.is_gauss_newton("toy.sign_sgd")
    assert ap.get_batch_size("mnist", optimizer="toy.sign_sgd") == 16
    assert ap.get_batch_size("criteo1tb", optimizer="toy.sign_sgd") == 262_144
    d, c = 12, 4
    batches = _batches(3, 3, 10, d, c)
    batches[1]["weights"] = torch.tensor([1.0] * 7 + [0.0] * 3)
    model = _mlp(d, c)
    before = _full_loss(model, batches)
    workload = FakeWorkload()
    state, model = _train(workload, model, batches, {"learning_rate": 0.01}, "toy.sign_sgd")
    assert type(state["optimizer"]).__name__ == "SignSGD"
    assert state["optimizer"].param_groups[0]["lr"] == 0.01
    assert workload.masks[0] is None and torch.equal(workload.masks[1], batches[1]["weights"])
    assert _full_loss(model, batches) < before


def test_update_is_the_optimizers_own_step():
    """Through model_fn/loss_fn/backward/step the update equals DenseGN.step_on_batch."""
    d, c = 10, 3
    batches = _batches(1, 3, 8, d, c)
    model = _mlp(d, c, seed=1)
    twin = copy.deepcopy(model)
    _train(FakeWorkload(), model, batches, {"learning_rate": 0.7})
    ref = DenseGN(twin.parameters(), model=twin, lr=0.7, loss="cross_entropy",
                  rank_policy="warn")
    for b in batches:
        ref.step_on_batch(b["inputs"], b["targets"])
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_one_step_is_exact_gauss_newton_float64():
    """Oracle: with J = ∂vec F/∂θ by torch.func.jacrev (float64), the AlgoPerf update satisfies
    J Δθ = −α (softmax(F) − onehot(y)) to 1e-9."""
    d, c, n, alpha = 6, 3, 5, 0.3
    (batch,) = _batches(2, 1, n, d, c, dtype=torch.float64)
    model = _mlp(d, c, seed=2, dtype=torch.float64)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = batch["inputs"], batch["targets"]
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(theta0)
    J = torch.cat([jac[k].reshape(n * c, -1) for k in theta0], dim=1)
    with torch.no_grad():
        eps = torch.softmax(model(x), 1) - F.one_hot(y, c).double()
    _train(FakeWorkload(), model, [batch], {"learning_rate": alpha})
    delta = torch.cat([(p.detach() - theta0[k]).reshape(-1)
                       for k, p in model.named_parameters()])
    torch.testing.assert_close(J @ delta, -alpha * eps.reshape(-1), rtol=0, atol=1e-9)


# ------------------------------------------------------------------ AlgoPerf's checkpoints
def _algoperf_save_and_restore(path, optimizer_state, model_params, fresh_state, fresh_model):
    """AlgoPerf's PyTorch checkpoint round trip, statement by statement: ``save_checkpoint`` then
    ``maybe_restore_checkpoint`` of ``algoperf/checkpoint_utils.py`` (framework ``"pytorch"``;
    github.com/mlcommons/algorithmic-efficiency at commit 2c90454). Only the logging and the
    gfile clean-up of older checkpoints are left out. ``torch.load`` uses its default
    ``weights_only`` as AlgoPerf does (True since torch 2.6)."""
    # -- save_checkpoint(framework="pytorch", ...)
    if isinstance(model_params, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model_params = model_params.module
    model_params = model_params.state_dict()
    optimizer_state_dict = {}
    for key in optimizer_state.keys():
        if hasattr(optimizer_state[key], "state_dict"):
            optimizer_state_dict[key] = optimizer_state[key].state_dict()
        # else: AlgoPerf logs that the entry is not saved
    opt_state = optimizer_state_dict
    checkpoint_state = {"model_params": model_params, "optimizer_state": opt_state,
                        "model_state": None, "train_state": {}, "eval_results": tuple(),
                        "global_step": 2, "preemption_count": 0}
    save_path = path / "checkpoint_2"
    torch.save(checkpoint_state, save_path)
    # -- maybe_restore_checkpoint(framework="pytorch", fresh state, ...)
    optimizer_state, model_params = fresh_state, fresh_model
    latest_ckpt = torch.load(save_path, map_location="cpu")
    checkpoint_state = latest_ckpt
    if isinstance(model_params, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model_params = model_params.module
    model_params.load_state_dict(checkpoint_state["model_params"])
    checkpoint_state["model_params"] = model_params
    for key in optimizer_state.keys():
        optimizer_state[key].load_state_dict(checkpoint_state["optimizer_state"][key])
        checkpoint_state["optimizer_state"][key] = optimizer_state[key]
    return checkpoint_state["optimizer_state"], checkpoint_state["model_params"]


@pytest.mark.parametrize("optimizer,kind", [("dense_gn", "mlp"), ("exact_gn", "revmlp"),
                                            ("adam", "mlp")])
def test_optimizer_state_survives_algoperf_checkpoint_save_and_restore(optimizer, kind, tmp_path):
    """Two steps, AlgoPerf's save and its restore into a fresh model and state, one more step:
    the same parameters as three uninterrupted steps (Adam's moments included)."""
    d, c = 12, 4
    batches = _batches(4, 3, 8, d, c)
    make = (lambda: _mlp(d, c, seed=3)) if kind == "mlp" else (lambda: _revmlp(d, c, seed=3))
    hps = {"learning_rate": 0.05 if optimizer == "adam" else 0.5}
    straight = make()
    _train(FakeWorkload(), straight, batches, hps, optimizer)
    model = make()
    state, model = _train(FakeWorkload(), model, batches[:2], hps, optimizer)
    # AlgoPerf's save silently drops (with a logged warning) any entry without state_dict(), so
    # after an update every entry must still be a checkpointable object
    for key, value in state.items():
        assert callable(getattr(value, "state_dict", None)), key
        assert callable(getattr(value, "load_state_dict", None)), key
    fresh = make()
    fresh_state = ap.init_optimizer_state(FakeWorkload(), fresh, None, hps, None,
                                          optimizer=optimizer)
    state, model = _algoperf_save_and_restore(tmp_path, state, model, fresh_state, fresh)
    assert model is fresh and all(state[k] is fresh_state[k] for k in fresh_state)
    _steps(FakeWorkload(), model, state, batches[2:], hps, first_step=2)
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_restore_refuses_another_optimizers_checkpoint(tmp_path):
    model = _mlp(6, 3)
    state = ap.init_optimizer_state(FakeWorkload(), model, None, {"learning_rate": 0.1}, None)
    other = ap.init_optimizer_state(FakeWorkload(), _mlp(6, 3), None, {"learning_rate": 0.1},
                                    None, optimizer="sgd")
    with pytest.raises(ValueError, match="written by optimizer 'gnrev.dense_gn'"):
        _algoperf_save_and_restore(tmp_path, state, model, other, _mlp(6, 3))


# ------------------------------------------------------------------ batch sizes
def test_every_algoperf_workload_has_a_batch_size_or_a_reason():
    assert sorted(ap.WORKLOADS) == sorted(UPSTREAM_WORKLOADS)
    for name in UPSTREAM_WORKLOADS:
        ref = ap.get_batch_size(name, optimizer="gnrev.adam")
        assert ref == ap.REFERENCE_BATCH_SIZES[name] and ref > 0
        for gn in ("gnrev.dense_gn", "gnrev.exact_gn"):
            base = ap.WORKLOADS[name]
            if base == "mnist":
                assert ap.get_batch_size(name, optimizer=gn) == 128
                continue
            with pytest.raises(ValueError, match=f"cannot run AlgoPerf's '{name}'") as err:
                ap.get_batch_size(name, optimizer=gn)
            assert ap.GN_UNSUPPORTED[base] in str(err.value)
    # AlgoPerf's reference values (pytorch_nadamw_full_budget.get_batch_size)
    assert {n: ap.get_batch_size(n, optimizer="sgd") for n in (
        "criteo1tb", "fastmri", "imagenet_resnet", "imagenet_resnet_silu",
        "imagenet_resnet_gelu", "imagenet_vit", "librispeech_conformer",
        "librispeech_deepspeech", "ogbg", "wmt", "mnist", "wmt_glu_tanh")} == {
        "criteo1tb": 262_144, "fastmri": 32, "imagenet_resnet": 1024,
        "imagenet_resnet_silu": 512, "imagenet_resnet_gelu": 512, "imagenet_vit": 1024,
        "librispeech_conformer": 256, "librispeech_deepspeech": 256, "ogbg": 512, "wmt": 128,
        "mnist": 16, "wmt_glu_tanh": 128}
    assert ap.get_batch_size("cifar", optimizer="sgd") == 128
    # needs=("model", "loss") does not make an optimizer Gauss-Newton: SAM gets the references
    assert get_registry().entry("optimizer", "gnrev.sam").needs == ("model", "loss")
    assert not ap.is_gauss_newton("gnrev.sam")
    assert ap.get_batch_size("imagenet_resnet", optimizer="gnrev.sam") == 1024
    assert ap.get_batch_size("mnist") == ap.GN_BATCH_SIZES["mnist"]  # default: gnrev.dense_gn
    with pytest.raises(ValueError, match="unknown AlgoPerf workload 'imagenet'.*imagenet_vit"):
        ap.get_batch_size("imagenet")


# ------------------------------------------------------------------ DDP
@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as AlgoPerf's PyTorch DDP setup would create per rank."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        pytest.fail("torch.distributed is not available in this torch build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer,kind", [("dense_gn", "mlp"), ("exact_gn", "revmlp")])
def test_ddp_wrapped_model(process_group, optimizer, kind):
    """AlgoPerf hands the DDP wrapper; the GN optimizer gets the inner network and the update
    through the wrapper equals the explicit step on the bare twin."""
    d, c = 12, 4
    net = _mlp(d, c, seed=5) if kind == "mlp" else _revmlp(d, c, seed=5)
    twin = copy.deepcopy(net)
    ddp = nn.parallel.DistributedDataParallel(net)
    hps = {"learning_rate": 0.4}
    state = ap.init_optimizer_state(FakeWorkload(), ddp, None, hps, None, optimizer=optimizer)
    assert state["optimizer"].model is net
    batches = _batches(5, 2, 8, d, c)
    _steps(FakeWorkload(), ddp, state, batches, hps)
    ref = {"dense_gn": DenseGN, "exact_gn": ExactGN}[optimizer](
        twin.parameters(), model=twin, lr=0.4, loss="cross_entropy", rank_policy="warn")
    for b in batches:
        ref.step_on_batch(b["inputs"], b["targets"])
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ap.unwrap_model(nn.DataParallel(net)) is net


# ------------------------------------------------------------------ DenseGN's warning
def test_dense_gn_warning_points_at_the_callers_line():
    """A rank-deficient step (n·C = 15 > P = 9) with rank_policy="warn" warns at the line that
    called step() / step_on_batch(), not inside torch's or gnrev's wrappers."""
    model = nn.Linear(2, 3)
    opt = DenseGN(model.parameters(), model=model, loss="cross_entropy", rank_policy="warn")
    x, y = torch.randn(5, 2), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(); step_line = sys._getframe().f_lineno  # noqa: E702
        opt.step_on_batch(x, y); batch_line = sys._getframe().f_lineno  # noqa: E702
    inexact = [w for w in caught if "not exact" in str(w.message)]
    assert [(Path(w.filename), w.lineno) for w in inexact] == [
        (Path(__file__), step_line), (Path(__file__), batch_line)]
    # through AlgoPerf the caller of step() is the adapter's update_params
    state = ap.init_optimizer_state(FakeWorkload(), model, None, {"learning_rate": 0.1}, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ap.update_params(FakeWorkload(), model, None, None, {}, {"inputs": x, "targets": y},
                         None, state, [], 0, None)
    (w,) = [w for w in caught if "not exact" in str(w.message)]
    assert Path(w.filename) == Path(ap.__file__)


# ------------------------------------------------------------------ contract errors
def test_contract_errors_are_clear():
    assert ap.loss_kind(LossType.MEAN_SQUARED_ERROR) == "mse"
    with pytest.raises(ValueError, match="CTC_LOSS"):
        ap.loss_kind(LossType.CTC_LOSS)
    d, c = 8, 3
    model = _mlp(d, c)
    workload = FakeWorkload()
    state = ap.init_optimizer_state(workload, model, None, {"learning_rate": 0.1}, None)
    (batch,) = _batches(0, 1, 6, d, c)
    batch["weights"] = torch.tensor([1.0, 1, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="masked"):
        ap.update_params(workload, model, None, None, {"learning_rate": 0.1}, batch, None,
                         state, [], 0, None)
    with pytest.raises(TypeError, match="nn.Module"):
        ap.init_optimizer_state(workload, dict(model.named_parameters()), None,
                                {"learning_rate": 0.1}, None)
    ctc = FakeWorkload()
    ctc.loss_type = LossType.CTC_LOSS
    with pytest.raises(ValueError, match="CTC_LOSS"):
        ap.init_optimizer_state(ctc, model, None, {"learning_rate": 0.1}, None)
    assert type(ap.init_optimizer_state(ctc, model, None, None, None, optimizer="adam")[
        "optimizer"]) is torch.optim.Adam  # a loss-agnostic optimizer does not care


# ------------------------------------------------------------------ export
def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_writes_a_loadable_submission(tmp_path, capsys):
    dest = tmp_path / "sub"
    assert gnrev_main(["algoperf", "export", str(dest), "--name", "gn_test"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [
        "submission.py", "submission_info.yml", "tuning_search_space.json"]
    module = _load(dest / "submission.py", "exported_submission")
    assert module.OPTIMIZER == ap.DEFAULT_OPTIMIZER == "gnrev.dense_gn"
    assert module.OPTIMIZER_KWARGS == {}
    for fn in ("update_params", "prepare_for_eval", "data_selection"):
        assert getattr(module, fn) is getattr(ap, fn)
    assert module.get_batch_size("mnist") == 128
    with pytest.raises(ValueError, match="cannot run"):
        module.get_batch_size("wmt")
    model = _mlp(8, 3)
    state = module.init_optimizer_state(FakeWorkload(), model, None, {"learning_rate": 0.3}, None)
    assert type(state["optimizer"]) is DenseGN and state["optimizer"].defaults["lr"] == 0.3
    space = json.loads((dest / "tuning_search_space.json").read_text())
    assert space == ap.tuning_search_space("gnrev.dense_gn")
    assert space["learning_rate"]["feasible_points"][1] == \
        get_registry().entry("optimizer", "gnrev.dense_gn").defaults["lr"]
    info = {}
    for line in (dest / "submission_info.yml").read_text().splitlines():
        key, value = line.split(": ", 1)
        info[key] = json.loads(value)
    assert set(info) == {"submission_name", "submission_folder", "authors", "affiliations",
                         "version", "ruleset", "framework", "description"}
    assert info["submission_name"] == "gn_test" and info["framework"] == "PyTorch"
    assert info["submission_folder"] == "submissions/external_tuning/gn_test"
    assert "gnrev.dense_gn" in info["description"]
    # refuses to overwrite; self-tuning writes no search space
    assert gnrev_main(["algoperf", "export", str(dest)]) == 2
    assert "already holds" in capsys.readouterr().err
    self_dir = tmp_path / "self"
    assert gnrev_main(["algoperf", "export", str(self_dir), "--ruleset", "self"]) == 0
    assert not (self_dir / "tuning_search_space.json").exists()


def test_export_by_registry_name_for_a_plugin_optimizer(toy_registry, tmp_path, capsys):
    dest = tmp_path / "toy"
    assert gnrev_main(["algoperf", "export", str(dest), "--optimizer", "toy.sign_sgd",
                       "--opt", "lr=0.05"]) == 0
    module = _load(dest / "submission.py", "exported_toy_submission")
    assert (module.OPTIMIZER, module.OPTIMIZER_KWARGS) == ("toy.sign_sgd", {"lr": 0.05})
    assert module.get_batch_size("mnist") == 16 and module.get_batch_size("ogbg") == 512
    model = _mlp(8, 3)
    opt = module.init_optimizer_state(FakeWorkload(), model, None, None, None)["optimizer"]
    assert type(opt).__name__ == "SignSGD" and opt.param_groups[0]["lr"] == 0.05
    info = (dest / "submission_info.yml").read_text()
    assert 'submission_name: "gnrev_toy_sign_sgd"' in info
    assert json.loads((dest / "tuning_search_space.json").read_text()) == {
        "learning_rate": {"feasible_points": [0.00333333, 0.01, 0.03]}}
    assert gnrev_main(["algoperf", "export", str(tmp_path / "x"), "--optimizer", "toy.nope"]) == 2
    assert "known optimizers: " in capsys.readouterr().err
