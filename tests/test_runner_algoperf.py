"""AlgoPerf adapter: the five submission functions drive exact GN through a fake workload that
follows AlgoPerf's documented PyTorch ``model_fn`` / ``loss_fn`` contract; export writes a
loadable submission folder."""

from __future__ import annotations

import copy
import enum
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from gnrev_plugin.cli import main as gnrev_main
from gnrev_plugin.hosts import algoperf as ap
from gnrev_plugin.nn import RevMLP
from gnrev_plugin.optim import DenseGN, ExactGN


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

    def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state, mode, rng,
                 update_batch_norm, dropout_rate=None):
        assert isinstance(params, nn.Module) and update_batch_norm is True
        self.model_fn_calls += 1
        train = mode == ap.ForwardPassMode.TRAIN
        params.train(train)
        with torch.set_grad_enabled(train):
            logits = params(augmented_and_preprocessed_input_batch["inputs"])
        return logits, model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
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


def _full_loss(model, batches):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(b["inputs"]), b["targets"])) for b in batches)


def _train(workload, model, batches, hps, steps):
    state = ap.init_optimizer_state(workload, model, None, hps, rng=None)
    queue = iter(batches)
    losses = []
    for step in range(steps):
        batch = ap.data_selection(workload, queue, state, model, None, hps, step, None)
        state, model, _ = ap.update_params(workload, model, None, None, hps, batch,
                                           LossType.SOFTMAX_CROSS_ENTROPY, state, [], step, None)
        losses.append(state["last_loss"])
        state, model, _ = ap.prepare_for_eval(workload, model, None, None, hps,
                                              LossType.SOFTMAX_CROSS_ENTROPY, state, [], step,
                                              None)
    return state, model, losses


@pytest.mark.parametrize("kind", ["mlp", "revmlp"])
def test_three_steps_decrease_the_loss(kind):
    d, c = 12, 4
    batches = _batches(0, 3, 10, d, c)
    model = (_mlp(d, c) if kind == "mlp" else
             RevMLP(d, hidden=24, num_blocks=2, num_classes=c, linear_first_block=False,
                    init_std=0.1, seed=0))
    before = _full_loss(model, batches)
    workload = FakeWorkload()
    hps = {"learning_rate": 0.5}
    state, model, _ = _train(workload, model, batches, hps, steps=3)
    assert isinstance(state["optimizer"], DenseGN if kind == "mlp" else ExactGN)
    assert workload.model_fn_calls == 3
    assert _full_loss(model, batches) < before


def test_update_is_the_optimizers_own_step():
    """Through model_fn/loss_fn/backward/step the update equals DenseGN.step_on_batch."""
    d, c = 10, 3
    batches = _batches(1, 3, 8, d, c)
    model = _mlp(d, c, seed=1)
    twin = copy.deepcopy(model)
    _train(FakeWorkload(), model, batches, {"learning_rate": 0.7}, steps=3)
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
    _train(FakeWorkload(), model, [batch], {"learning_rate": alpha}, steps=1)
    delta = torch.cat([(p.detach() - theta0[k]).reshape(-1)
                       for k, p in model.named_parameters()])
    torch.testing.assert_close(J @ delta, -alpha * eps.reshape(-1), rtol=0, atol=1e-9)


def test_contract_errors_are_clear():
    assert ap.get_batch_size("mnist") == ap.BATCH_SIZES["mnist"]
    with pytest.raises(ValueError, match="supported: mnist, cifar"):
        ap.get_batch_size("imagenet_resnet")
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


def test_export_writes_a_loadable_submission(tmp_path, capsys):
    dest = tmp_path / "sub"
    assert gnrev_main(["algoperf", "export", str(dest), "--name", "gn_test"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [
        "submission.py", "submission_info.yml", "tuning_search_space.json"]
    spec = importlib.util.spec_from_file_location("exported_submission", dest / "submission.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_batch_size", "init_optimizer_state", "update_params", "prepare_for_eval",
               "data_selection"):
        assert getattr(module, fn) is getattr(ap, fn)
    space = json.loads((dest / "tuning_search_space.json").read_text())
    assert space == ap.TUNING_SEARCH_SPACE and "learning_rate" in space
    info = {}
    for line in (dest / "submission_info.yml").read_text().splitlines():
        key, value = line.split(": ", 1)
        info[key] = json.loads(value)
    assert set(info) == {"submission_name", "submission_folder", "authors", "affiliations",
                         "version", "ruleset", "framework", "description"}
    assert info["submission_name"] == "gn_test" and info["framework"] == "PyTorch"
    assert info["submission_folder"] == "submissions/external_tuning/gn_test"
    # refuses to overwrite; self-tuning writes no search space
    assert gnrev_main(["algoperf", "export", str(dest)]) == 2
    assert "already holds" in capsys.readouterr().err
    self_dir = tmp_path / "self"
    assert gnrev_main(["algoperf", "export", str(self_dir), "--ruleset", "self"]) == 0
    assert not (self_dir / "tuning_search_space.json").exists()
