"""``gnrev algoperf export``: a submission folder bound to one registered optimizer."""

from __future__ import annotations

import json
from pathlib import Path

from gnrev_plugin.registry import Registry

from .submission import (
    DEFAULT_LOG_EVERY,
    DEFAULT_OPTIMIZER,
    _refuse_revmlp_only,
    _registry,
    is_gauss_newton,
    tuning_search_space,
)

__all__ = ["default_submission_name", "export_submission"]

_SUBMISSION_PY = '''"""AlgoPerf submission: the registered optimizer {name!r}, through gnrev-plugin.

Written by ``gnrev algoperf export``. Requires ``gnrev-plugin`` (and the plugin that registers
{name!r}) in the submission's environment. The five functions are
:mod:`gnrev_plugin.hosts.algoperf`'s, bound to this optimizer and these fixed options.
"""

from gnrev_plugin.hosts import algoperf as _gnrev

OPTIMIZER = {name!r}
OPTIMIZER_KWARGS = {kwargs!r}
LOG_EVERY = {log_every!r}  # updates between two exactness records in AlgoPerf's measurements.csv


def get_batch_size(workload_name):
    return _gnrev.get_batch_size(workload_name, optimizer=OPTIMIZER)


def init_optimizer_state(workload, model_params, model_state, hyperparameters, rng):
    return _gnrev.init_optimizer_state(workload, model_params, model_state, hyperparameters,
                                       rng, optimizer=OPTIMIZER,
                                       optimizer_kwargs=OPTIMIZER_KWARGS, log_every=LOG_EVERY)


update_params = _gnrev.update_params
prepare_for_eval = _gnrev.prepare_for_eval
data_selection = _gnrev.data_selection
'''


def default_submission_name(optimizer: str) -> str:
    """``gnrev_`` and the registered name with dots as underscores, the ``gnrev.`` namespace of
    the built-in entries dropped: ``gnrev.dense_gn`` → ``gnrev_dense_gn``, a plugin's
    ``toy.sign_sgd`` → ``gnrev_toy_sign_sgd``.

    Args:
        optimizer: the resolved registry name.

    Returns:
        The submission name.
    """
    return "gnrev_" + optimizer.removeprefix("gnrev.").replace(".", "_")


def _yaml_scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def export_submission(dest: str | Path, name: str | None = None, *,
                      optimizer: str = DEFAULT_OPTIMIZER, optimizer_kwargs: dict | None = None,
                      authors: str = "gnrev-plugin developers", affiliations: str = "",
                      version: str = "1.0", ruleset: str = "external",
                      log_every: int = DEFAULT_LOG_EVERY, overwrite: bool = False,
                      registry: Registry | None = None) -> list[Path]:
    """Write ``submission.py`` (bound to registered ``optimizer``, ``optimizer_kwargs`` and the
    exactness log period ``log_every``), ``submission_info.yml`` and (external tuning)
    ``tuning_search_space.json`` (:func:`tuning_search_space`). ``name`` defaults to
    :func:`default_submission_name`.

    ``submission_info.yml`` carries the fields of AlgoPerf's submissions repository
    (``submission_name, submission_folder, authors, affiliations, version, ruleset, framework,
    description``). Returns the written paths.

    Raises:
        FileExistsError: if ``dest`` holds a ``submission.py`` and ``overwrite`` is false.
        UnknownNameError: ``optimizer`` is not registered (the message lists the names).
        RevMLPRequiredError: ``optimizer`` needs a RevMLP, which no AlgoPerf workload has.
    """
    if ruleset not in ("external", "self"):
        raise ValueError(f"ruleset must be 'external' or 'self', got {ruleset!r}")
    if int(log_every) < 1:
        raise ValueError(f"log_every must be a positive number of updates, got {log_every}")
    reg = _registry(registry)
    optimizer = reg.resolve_name("optimizer", optimizer)
    _refuse_revmlp_only(optimizer, None, reg)
    entry = reg.entry("optimizer", optimizer)
    kwargs = dict(optimizer_kwargs or {})
    json.dumps(kwargs, allow_nan=False)  # the options are JSON values
    name = name or default_submission_name(optimizer)
    dest = Path(dest)
    if (dest / "submission.py").exists() and not overwrite:
        raise FileExistsError(f"{dest} already holds a submission.py; pass --force to "
                              "overwrite it")
    dest.mkdir(parents=True, exist_ok=True)
    gn = " (Gauss-Newton: learning_rate is the function-space step alpha, J dtheta = -alpha "\
         "eps)" if is_gauss_newton(optimizer, reg) else ""
    info = {
        "submission_name": name,
        "submission_folder": f"submissions/{ruleset}_tuning/{name}",
        "authors": authors,
        "affiliations": affiliations,
        "version": version,
        "ruleset": ruleset,
        "framework": "PyTorch",
        "description": f"gnrev-plugin's registered optimizer {optimizer} "
                       f"({entry.description or entry.target}){gn}.",
    }
    paths = [dest / "submission.py", dest / "submission_info.yml"]
    paths[0].write_text(_SUBMISSION_PY.format(name=optimizer, kwargs=kwargs,
                                              log_every=int(log_every)))
    paths[1].write_text("".join(f"{k}: {_yaml_scalar(v)}\n" for k, v in info.items()))
    if ruleset == "external":  # the self-tuning ruleset has no search space
        paths.append(dest / "tuning_search_space.json")
        paths[2].write_text(json.dumps(tuning_search_space(optimizer, reg), indent=2) + "\n")
    return paths
