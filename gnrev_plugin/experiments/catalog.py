"""The reproductions by name: ``{name: Experiment}``, the one dispatch behind ``gnrev reproduce``
and ``gnrev report``.

Each experiment is a sub-package with a ``run`` module (trains and logs, through the registry) and
a ``report`` module (figures and ``report.md`` from the logs alone). :func:`build_report` reads
``OUT/config.json`` to learn which experiment wrote ``OUT`` and calls its report builder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gnrev_plugin.engine.rundir import RunDir

from .conditioning import build_conditioning_report, run_conditioning
from .exact_gn import build_exact_gn_report, run_exact_gn
from .laziness import build_laziness_report, run_laziness
from .nme import build_nme_report, run_nme
from .sharpness import build_sharpness_report, run_sharpness

__all__ = ["Experiment", "EXPERIMENTS", "build_report"]


@dataclass(frozen=True)
class Experiment:
    """A reproduction: ``run(out, preset_name=, data=, data_dir=, resume=, progress=, device=,
    callbacks=)`` returns one status dict per run (and writes the report; ``callbacks`` join
    every training run on the engine); ``report(out, config)`` rebuilds the report from the logs
    (``config`` = ``OUT/config.json``)."""

    name: str
    paper: str
    run: Callable[..., list[dict]]
    report: Callable[[Path, dict], Path]


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (
        Experiment("exact-gn", "Buffelli et al., NeurIPS 2024", run_exact_gn,
                   build_exact_gn_report),
        Experiment("conditioning", "Zhao, Singh & Lucchi, NeurIPS 2024", run_conditioning,
                   build_conditioning_report),
        Experiment("nme", "Dauphin, Agarwala & Mobahi, NeurIPS 2024", run_nme,
                   build_nme_report),
        Experiment("sharpness", "Dauphin, Agarwala & Mobahi, NeurIPS 2024", run_sharpness,
                   build_sharpness_report),
        Experiment("laziness", "Buffelli et al., NeurIPS 2024 (is exact GN lazy?)", run_laziness,
                   build_laziness_report),
    )
}


def build_report(out: str | Path) -> Path:
    """Rebuild ``OUT/report.md`` and ``OUT/figures/*.png`` from the logs of the experiment named
    in ``OUT/config.json``."""
    out = Path(out)
    cfg_path = out / RunDir.CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{out} is not a reproduction directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    name = cfg.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"{cfg_path} names an unknown experiment {name!r}; known: "
                         f"{', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name].report(out, cfg)
