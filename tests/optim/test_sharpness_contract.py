"""The sharpness wrappers as registered optimizers: registry, runners, drop-in and closure paths,
state dicts, parameter groups and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gnrev_plugin.build import RunSpec, build, build_optimizer
from gnrev_plugin.defaults import OPTIMIZER_DEFAULTS
from gnrev_plugin.nn import MLP, RevMLP
from gnrev_plugin.optim import PSAM, SAM, GNTracePenalty, HessianTracePenalty, WeightNoise
from gnrev_plugin.optim.errors import LossCaptureError, NonFiniteError
from gnrev_plugin.registry import UnknownNameError, get_registry
from gnrev_plugin.registry.regularizer_entries import registry_base
from gnrev_plugin.stepping import train_step

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DT = torch.float64
NAMES = {"gnrev.sam": SAM, "gnrev.psam": PSAM, "gnrev.weight_noise": WeightNoise,
         "gnrev.hessian_trace_penalty": HessianTracePenalty,
         "gnrev.gn_trace_penalty": GNTracePenalty}
NOISY = (WeightNoise, HessianTracePenalty, GNTracePenalty)
KW = {SAM: dict(rho=0.1), PSAM: dict(rho=0.1), WeightNoise: dict(sigma2=0.01, seed=1),
      HessianTracePenalty: dict(sigma2=0.01, seed=1), GNTracePenalty: dict(sigma2=0.01, seed=1)}


def problem(act="gelu", seed=0, n=16):
    torch.manual_seed(seed)
    model = MLP(in_features=5, num_classes=3, hidden=[6, 6], activation=act, dtype=DT)
    x = torch.randn(n, 5, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def params_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------ registry and runners
@pytest.mark.parametrize("name", sorted(NAMES))
def test_registered_with_needs_defaults_and_shared_param_groups(name):
    reg = get_registry()
    entry = reg.entry("optimizer", name)
    assert entry.needs == ("model", "loss")
    assert entry.defaults == OPTIMIZER_DEFAULTS[name]
    model, *_ = problem()
    opt = build_optimizer(name.removeprefix("gnrev."), model, {"momentum": 0.9},
                          loss="cross_entropy")
    assert type(opt) is NAMES[name] and opt.model is model and opt.loss_kind == "cross_entropy"
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups is opt.base_optimizer.param_groups
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["momentum"] == 0.9  # base options in the same group
    method_key = "rho" if NAMES[name] in (SAM, PSAM) else "sigma2"
    assert group[method_key] == OPTIMIZER_DEFAULTS[name][method_key]
    opt.close()


def test_a_run_spec_builds_and_trains_through_step_on_batch():
    spec = RunSpec(model="mlp", model_kwargs={"hidden": [8], "activation": "gelu"},
                   optimizer="psam", optimizer_kwargs={"rho": 0.2, "ablate_nme": True},
                   dataset="teacher_student", epochs=1)
    built = build(spec, in_features=5, num_classes=3)
    assert built.spec.optimizer == "gnrev.psam"
    assert built.spec.optimizer_kwargs == {**OPTIMIZER_DEFAULTS["gnrev.psam"], "rho": 0.2,
                                           "ablate_nme": True}
    x = torch.randn(32, 5)
    y = torch.randint(0, 3, (32,))
    twin = copy.deepcopy(built.model)
    ref = PSAM(twin.parameters(), rho=0.2, lr=0.1, ablate_nme=True, model=twin)
    res = train_step(built.optimizer, built.model, built.loss_fn, x, y)
    ref.step_on_batch(x, y)
    assert torch.equal(params_of(built.model), params_of(twin))
    assert res.loss_before == pytest.approx(ref.last_step_info["loss"], rel=1e-6)
    assert res.loss_after < res.loss_before


@pytest.mark.parametrize("cls", list(NAMES.values()))
def test_mse_runs_with_one_hot_targets(cls):
    model, x, y = problem()
    Y = nn.functional.one_hot(y, 3).to(DT)
    opt = cls(model.parameters(), model=model, loss="mse", lr=0.5, **KW[cls])
    before = float(nn.MSELoss()(model(x), Y).detach())
    assert float(opt.step_on_batch(x, Y)) == pytest.approx(before, rel=1e-12)
    assert float(nn.MSELoss()(model(x), Y).detach()) < before


# ------------------------------------------------------------------ drop-in and closure paths
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("cls", list(NAMES.values()))
def test_drop_in_backward_then_step_equals_step_on_batch(cls, ablate):
    """``loss = crit(model(x), y); loss.backward(); opt.step()`` takes the step of
    ``step_on_batch(x, y)`` (same draws)."""
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = cls(model.parameters(), model=model, lr=0.2, ablate_nme=ablate, **KW[cls])
    ref = cls(twin.parameters(), model=twin, lr=0.2, ablate_nme=ablate, **KW[cls])
    for _ in range(2):
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        out = opt.step()
        ref_loss = ref.step_on_batch(x, y)
        assert float(out) == pytest.approx(float(ref_loss), rel=1e-12)
        assert torch.allclose(params_of(model), params_of(twin), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", [PSAM, HessianTracePenalty, GNTracePenalty])
def test_a_closure_supplies_the_batch_to_the_hvp_methods(cls):
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = cls(model.parameters(), model=model, lr=0.2, **KW[cls])
    ref = cls(twin.parameters(), model=twin, lr=0.2, **KW[cls])

    def closure():
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    ref.step_on_batch(x, y)
    assert torch.allclose(params_of(model), params_of(twin), rtol=0, atol=1e-14)


def _closure(opt, model, x, y, crit):
    def closure():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("backward_first", [True, False])
def test_sam_closure_path_matches_the_functional_step(backward_first):
    """``step(closure)`` evaluates ∇L(θ) itself: stale or fresh gradients already in ``p.grad``
    make no difference."""
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = SAM(model.parameters(), rho=0.1, model=model, lr=0.2, momentum=0.5)
    ref = SAM(twin.parameters(), rho=0.1, model=twin, lr=0.2, momentum=0.5)
    closure = _closure(opt, model, x, y, nn.CrossEntropyLoss())
    for _ in range(2):
        if backward_first:
            closure()
        out = opt.step(closure)
        ref_loss = ref.step_on_batch(x, y)
        assert float(out) == pytest.approx(float(ref_loss), rel=1e-12)
        assert torch.allclose(params_of(model), params_of(twin), rtol=0, atol=1e-14)


def test_sam_closure_works_for_a_loss_the_drop_in_path_cannot_see():
    """Label smoothing: the closure path is SAM on that loss (checked against a hand-made
    ascent), while the drop-in path refuses it."""
    model, x, y = problem()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    v0 = params_of(model)
    opt = SAM(model.parameters(), rho=0.1, model=model, lr=1.0)
    # the expected step, by hand with autograd
    ps = list(model.parameters())
    g = torch.autograd.grad(crit(model(x), y), ps)
    gn = torch.sqrt(sum((t * t).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(ps, g, strict=True):
            p.add_(0.1 * t / gn)
    g_eps = torch.autograd.grad(crit(model(x), y), ps)
    with torch.no_grad():
        for p, t in zip(ps, g, strict=True):
            p.sub_(0.1 * t / gn)
    assert torch.allclose(params_of(model), v0, rtol=0, atol=1e-15)
    opt.step(_closure(opt, model, x, y, crit))
    expected = v0 - torch.cat([t.reshape(-1) for t in g_eps])
    assert torch.allclose(params_of(model), expected, rtol=0, atol=1e-14)
    opt.zero_grad()
    crit(model(x), y).backward()
    with pytest.raises(LossCaptureError, match="label_smoothing"):
        opt.step()


def test_weight_noise_closure_path_matches_the_functional_step():
    model, x, y = problem()
    twin = copy.deepcopy(model)
    opt = WeightNoise(model.parameters(), sigma2=0.01, samples=2, seed=7, model=model, lr=0.2)
    ref = WeightNoise(twin.parameters(), sigma2=0.01, samples=2, seed=7, model=twin, lr=0.2)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y, nn.CrossEntropyLoss()))
        ref.step_on_batch(x, y)
        assert torch.allclose(params_of(model), params_of(twin), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ state and groups
@pytest.mark.parametrize("cls", list(NAMES.values()))
def test_state_dict_round_trip_resumes_exactly(cls):
    """Momentum buffers (the base's) and the method's generator state are saved: a resumed
    optimizer takes the very step the original takes."""
    model, x, y = problem()
    opt = cls(model.parameters(), model=model, lr=0.2, momentum=0.9, **KW[cls])
    opt.step_on_batch(x, y)
    opt.step_on_batch(x, y)
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    other = cls(twin.parameters(), model=twin, lr=0.5, momentum=0.1,
                **{**KW[cls], **({"seed": 99} if cls in NOISY else {})})
    other.load_state_dict(sd)
    assert other.param_groups is other.base_optimizer.param_groups
    assert other.param_groups[0]["lr"] == 0.2 and other.param_groups[0]["momentum"] == 0.9
    opt.step_on_batch(x, y)
    other.step_on_batch(x, y)
    assert torch.equal(params_of(model), params_of(twin))


def test_an_lr_scheduler_on_the_wrapper_drives_the_base():
    model, x, y = problem()
    opt = PSAM(model.parameters(), rho=0.1, model=model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(opt, model, x, y, nn.CrossEntropyLoss()))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    v0 = params_of(model)
    _, d = opt.compute_direction(x, y)
    opt.step_on_batch(x, y)
    flat_d = torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])
    assert torch.allclose(params_of(model), v0 - 0.5 * flat_d, rtol=0, atol=1e-14)


def test_a_registry_base_with_its_own_options():
    model, x, y = problem()
    opt = SAM(model.parameters(), rho=0.05, base=registry_base("adam"),
              base_kwargs={"betas": (0.8, 0.9)},
              model=model)
    assert isinstance(opt.base_optimizer, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 1e-3  # gnrev.adam's registered default
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt.step_on_batch(x, y)
    opt2 = SAM(model.parameters(), base=torch.optim.SGD, lr=0.3, model=model)
    assert isinstance(opt2.base_optimizer, torch.optim.SGD) and opt2.param_groups[0]["lr"] == 0.3


def test_compute_direction_changes_nothing():
    model, x, y = problem()
    opt = PSAM(model.parameters(), rho=0.1, model=model, momentum=0.9)
    v0 = params_of(model)
    opt.compute_direction(x, y)
    assert torch.equal(params_of(model), v0)
    assert all(p.grad is None for p in model.parameters())
    assert not opt.base_optimizer.state


def test_frozen_parameters_stay_fixed():
    model, x, y = problem()
    model[0].weight.requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    opt = build_optimizer("hessian_trace_penalty", model, {"sigma2": 0.01})
    opt.step_on_batch(x, y)
    assert torch.equal(model[0].weight, w0)
    assert not torch.equal(params_of(model), params_of(problem()[0]))


# ------------------------------------------------------------------ clear errors
@pytest.mark.parametrize("cls, kwargs, message", [
    (SAM, dict(rho=-0.1), r"rho must be a finite number ≥ 0"),
    (PSAM, dict(rho=float("nan")), r"rho must be a finite number"),
    (WeightNoise, dict(sigma2=float("inf")), r"sigma2 must be a finite number ≥ 0"),
    (GNTracePenalty, dict(samples=0), r"samples must be an integer ≥ 1"),
    (HessianTracePenalty, dict(probes="sobol"), r"probes must be one of"),
    (SAM, dict(loss="hinge"), r"unsupported loss 'hinge'"),
    (SAM, dict(ablate_nme="yes"), r"ablate_nme must be a bool"),
    (PSAM, dict(lr=0.1, base_kwargs={"lr": 0.2}), r"\['lr'\] given both as keywords"),
    (PSAM, dict(base_kwargs={"nesterov_typo": True}), r"base optimizer SGD rejected"),
    (WeightNoise, dict(seed=1.5), r"seed must be an integer"),
])
def test_bad_hyperparameters_are_clear_errors(cls, kwargs, message):
    model, *_ = problem()
    with pytest.raises(ValueError, match=message):
        cls(model.parameters(), model=model, **kwargs)


def test_bad_bases_are_clear_errors():
    model, *_ = problem()
    with pytest.raises(UnknownNameError, match="known optimizers: gnrev.adam"):
        registry_base("lbfgs")
    with pytest.raises(ValueError, match=r"'gnrev.exact_gn' needs \['model', 'loss'\]"):
        SAM(model.parameters(), base=registry_base("exact_gn"), model=model)
    with pytest.raises(ValueError, match=r"'gnrev.psam' needs"):
        registry_base("psam")
    with pytest.raises(TypeError, match="Optimizer subclass or a factory"):
        SAM(model.parameters(), base=42, model=model)
    with pytest.raises(TypeError, match="registry names such as 'gnrev.sgd' are resolved by the"):
        SAM(model.parameters(), base="gnrev.sgd", model=model)   # the core never reads the registry


def test_ablation_needs_module_activations():
    model = RevMLP(in_features=4, hidden=8, num_blocks=1, num_classes=3)
    with pytest.raises(ValueError, match="activations as nn.Module instances"):
        PSAM(model.parameters(), model=model, ablate_nme=True)
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ELU(inplace=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="in-place"):
        PSAM(inplace.parameters(), model=inplace, ablate_nme=True)


def test_bad_batches_and_missing_backward_are_clear_errors():
    model, x, y = problem()
    opt = PSAM(model.parameters(), model=model)
    with pytest.raises(ValueError, match="integer class indices"):
        opt.step_on_batch(x, y.to(DT))
    with pytest.raises(ValueError, match="one target per input"):
        opt.step_on_batch(x, y[:3])
    with pytest.raises(LossCaptureError, match="no forward pass of the model was captured"):
        opt.step()
    mse = PSAM(model.parameters(), model=model, loss="mse")
    with pytest.raises(ValueError, match=r"MSE targets must be floating \(B, C\)"):
        mse.step_on_batch(x, y)
    for closure_opt in (SAM(model.parameters(), model=model, ablate_nme=True),
                        WeightNoise(model.parameters(), model=model, ablate_nme=True)):
        with pytest.raises(ValueError, match="cannot linearise the activations through a closure"):
            closure_opt.step(lambda: None)


def test_a_non_finite_direction_changes_nothing():
    model, x, y = problem()
    opt = PSAM(model.parameters(), model=model)
    bad = x.clone()
    bad[0, 0] = float("nan")
    v0 = params_of(model)
    with pytest.raises(NonFiniteError, match="parameters were not changed"):
        opt.step_on_batch(bad, y)
    assert torch.equal(params_of(model), v0)


def test_ablate_nme_is_model_wide():
    model, x, y = problem()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="ablate_nme is a model-wide option"):
        PSAM([{"params": ps[:2], "ablate_nme": True}, {"params": ps[2:]}], model=model)
    opt = PSAM([{"params": ps[:2]}, {"params": ps[2:]}], model=model)
    opt.param_groups[1]["ablate_nme"] = True
    with pytest.raises(ValueError, match="ablate_nme is a model-wide option"):
        opt.step_on_batch(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("cls", list(NAMES.values()))
def test_a_cuda_model_steps_on_the_gpu(cls, ablate):
    """SAM/PSAM (no randomness) take the CPU step to 1e-12; the noisy methods draw from a
    generator on the parameters' device."""
    model, x, y = problem()
    gpu = copy.deepcopy(model).cuda()
    cpu_opt = cls(model.parameters(), model=model, lr=0.2, ablate_nme=ablate, **KW[cls])
    gpu_opt = cls(gpu.parameters(), model=gpu, lr=0.2, ablate_nme=ablate, **KW[cls])
    cpu_opt.step_on_batch(x, y)
    gpu_opt.step_on_batch(x.cuda(), y.cuda())
    if cls in NOISY:
        assert gpu_opt._gen.device.type == "cuda"
        assert bool(torch.isfinite(params_of(gpu)).all())
    else:
        assert torch.allclose(params_of(gpu).cpu(), params_of(model), rtol=0, atol=1e-12)
