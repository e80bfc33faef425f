"""Cockpit on a RevMLP, ExactGN against SGD, on the shared MNIST split (the run behind
``docs/hosts/cockpit.md``).

Data: the shared MNIST test-split files (``load_dataset("mnist")``: first 8,000 images for
training, last 2,000 for testing, MNIST normalisation), average-pooled 2×2 to 14×14 = 196 features
so that Cockpit's ``HessTrace``/``TICDiag`` (BackPACK ``DiagHessian``) stay cheap with smooth
activations. Model: ``RevMLP(196, M=256, L=2, C=10)``, GELU in both blocks, ``init_std=1e-3``,
float32, ``seed=0`` (the same initial weights for both runs). Each optimizer trains for
``--steps`` mini-batches of 64 drawn in the same order, under Cockpit's ``configuration("full")``
plus gnrev's four quantities (probe batch: the first 32 test images), with
``gnrev_plugin.hosts.backpack.enable()`` as the only set-up; every 10 steps the test loss and
accuracy on the 2,000 test images go to ``cockpit.log``.

ExactGN (``lr=0.2``, cross-entropy, identity Newton target) steps through ``opt.step_on_batch(X,
y)`` on the batch Cockpit just saw (the same update as the drop-in ``opt.step()``); SGD uses
``lr=0.1``.

Writes ``docs/results/figures/cockpit/`` (``cockpit_<opt>.png``: Cockpit's dashboard with gnrev's column,
``exactgn_vs_sgd.png``, ``run.json``) and prints the numbers quoted in the docs.

Usage: ``python benchmarks/cockpit_mnist.py [--steps 40] [--data-dir DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def pooled_mnist(data_dir: str | None):
    from gnrev_plugin.data import load_dataset

    ds = load_dataset("mnist", data_dir=data_dir)

    def pool(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x.reshape(-1, 1, 28, 28), 2).reshape(len(x), -1)
    return pool(ds.x_train), ds.y_train, pool(ds.x_test), ds.y_test, ds.info


def run(name: str, steps: int, data, batch: int = 64, seed: int = 0) -> dict:
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    from gnrev_plugin.hosts.cockpit import gnrev_quantities, plot
    from gnrev_plugin.nn import RevMLP
    from gnrev_plugin.optim import ExactGN

    x_tr, y_tr, x_te, y_te, _ = data
    model = extend(RevMLP(x_tr.shape[1], 256, 2, 10, activation="gelu", linear_first_block=False,
                          init_std=1e-3, seed=seed))
    loss_fn = extend(nn.CrossEntropyLoss())
    per_sample = nn.CrossEntropyLoss(reduction="none")
    if name == "exactgn":
        opt = ExactGN(model.parameters(), lr=0.2, loss="cross_entropy", rank_policy="warn")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cp = Cockpit(model.parameters(),
                 quantities=configuration("full") + gnrev_quantities(model, x_te[:32]))
    order = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        X, y = x_tr[idx], y_tr[idx]
        opt.zero_grad()
        out = model(X)
        loss = loss_fn(out, y)
        with cp(step, info={"batch_size": len(y), "individual_losses": per_sample(out, y),
                            "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=cp.create_graph(step))
        if isinstance(opt, ExactGN):
            opt.step_on_batch(X, y)
        else:
            opt.step()
        if step % 10 == 0 or step == steps - 1:
            with torch.no_grad():
                logits = model.features(x_te) @ model.readout  # no hooks: eval pass
                test_loss = nn.functional.cross_entropy(logits, y_te).item()
                test_acc = (logits.argmax(1) == y_te).float().mean().item()
                batch_acc = (out.argmax(1) == y).float().mean().item()
            cp.log(step, 0, loss.item(), test_loss, test_loss, batch_acc, test_acc, test_acc,
                   opt.param_groups[0]["lr"])
    seconds = time.perf_counter() - t0
    return {"cockpit": cp, "seconds": seconds, "plot": plot}


def summarise(cp, steps: int) -> dict:
    out = cp.get_output()
    last = steps - 1

    def scalar(step, key):
        v = out[step].get(key)
        return None if v is None else float(v if not isinstance(v, list) else sum(v))

    gn = [out[s].get("GNStepExactness") for s in range(steps)]
    gn_defined = [g for g in gn if isinstance(g, dict) and g.get("defined", True)]
    logged = sorted(s for s in out if "test_accuracy" in out[s])
    return {
        "loss_first": scalar(0, "Loss"), "loss_last": scalar(last, "Loss"),
        "test_accuracy_last": out[logged[-1]]["test_accuracy"],
        "test_loss_last": out[logged[-1]]["test_loss"],
        "hess_trace_first": scalar(0, "HessTrace"), "hess_trace_last": scalar(last, "HessTrace"),
        "hess_max_ev_first": scalar(0, "HessMaxEV"), "hess_max_ev_last": scalar(last, "HessMaxEV"),
        "nme_trace_first": scalar(0, "NMETrace"), "nme_trace_last": scalar(last, "NMETrace"),
        "ntk_similarity_last": scalar(last, "NTKSimilarityToInit"),
        "cka_last": scalar(last, "CKAToInit"),
        "gn_steps_exact": sum(g["exact"] == 1.0 for g in gn_defined),
        "gn_steps_reported": len(gn_defined),
        "gn_max_residual": max((g["max_residual"] for g in gn_defined), default=None),
        "gn_undefined_reason": next((g["reason"] for g in gn if isinstance(g, dict)
                                     and not g.get("defined", True)), None),
        "quantities": sorted(k for k in out[0] if k[0].isupper()),
    }


def _commit() -> str | None:
    """``HEAD``, with ``+dirty`` when tracked files differ from it (the numbers then do not come
    from a committed state)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def comparison_figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Loss", "mini-batch loss"), ("HessMaxEV", "Cockpit HessMaxEV (λ_max H)"),
              ("HessTrace", "Cockpit HessTrace (tr H)"), ("NMETrace", "gnrev tr(NME)"),
              ("NTKSimilarityToInit", "gnrev NTK similarity to init"),
              ("CKAToInit", "gnrev CKA to init (last block)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for name, res in results.items():
            out = res["cockpit"].get_output()
            steps = sorted(s for s in out if key in out[s])
            vals = [sum(v) if isinstance(v, list) else v for v in (out[s][key] for s in steps)]
            ax.plot(steps, vals, label={"exactgn": "ExactGN", "sgd": "SGD"}[name])
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes.flat[0].legend()
    fig.suptitle("RevMLP (GELU, d=196, M=256, L=2) on MNIST: ExactGN vs SGD under Cockpit")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "figures" / "cockpit"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    from gnrev_plugin.hosts.backpack import enable

    enable()
    data = pooled_mnist(args.data_dir)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, summary = {}, {}
    for name in ("exactgn", "sgd"):
        res = run(name, args.steps, data)
        results[name] = res
        summary[name] = {**summarise(res["cockpit"], args.steps),
                         "seconds": round(res["seconds"], 1)}
        title = {"exactgn": "Cockpit + gnrev: ExactGN", "sgd": "Cockpit + gnrev: SGD"}[name]
        res["plot"](res["cockpit"], str(out_dir / f"cockpit_{name}.png"), title=title, dpi=70)
    comparison_figure(results, out_dir / "exactgn_vs_sgd.png")
    record = {"data": data[4], "pooling": "2x2 average, 14x14 = 196 features",
              "train_images": len(data[1]), "test_images": len(data[3]), "steps": args.steps,
              "batch": 64, "model": "RevMLP(196, 256, 2, 10, gelu, linear_first_block=False, "
              "init_std=1e-3, seed=0), float32", "results": summary,
              "torch": torch.__version__, "commit": _commit()}
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    print(f"MNIST ({record['train_images']} train / {record['test_images']} test images, "
          f"pooled to 196 features), {args.steps} steps of 64, Cockpit 'full' + gnrev")
    cols = [("loss_first", "loss@0"), ("loss_last", "loss@end"),
            ("test_accuracy_last", "test acc"), ("hess_max_ev_first", "λmax@0"),
            ("hess_max_ev_last", "λmax@end"), ("hess_trace_last", "trH@end"),
            ("nme_trace_first", "trNME@0"), ("nme_trace_last", "trNME@end"),
            ("ntk_similarity_last", "NTKsim@end"), ("cka_last", "CKA@end"),
            ("gn_steps_exact", "exact GN steps"), ("gn_max_residual", "max GN resid"),
            ("seconds", "s")]
    print("| optimizer | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, s in summary.items():
        def fmt(v):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "undefined"
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        label = {"exactgn": "ExactGN", "sgd": "SGD"}[name]
        print(f"| {label} | " + " | ".join(fmt(s[c[0]]) for c in cols) + " |")
    print("GN step exactness for SGD:", summary["sgd"]["gn_undefined_reason"])
    print("quantities logged:", ", ".join(summary["exactgn"]["quantities"]))


if __name__ == "__main__":
    main()
