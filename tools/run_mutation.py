"""Mutation testing of the core math modules with mutmut 3 (``tox -e mutation``, docs/testing.md).

Every group runs in its own scratch copy of the repository (the working tree, or ``--ref`` as
committed), never in the checkout: mutmut writes its mutants under ``<copy>/mutants/``. A group
mutates one or two modules (``only_mutate``), restricted to the mutant names it lists, and runs only
the test files that cover them; within those, mutmut runs for each mutant just the tests that
executed the mutated function, fastest first, stopping at the first failure.

    python tools/run_mutation.py                       # all groups, working tree
    python tools/run_mutation.py --ref HEAD --groups targets,conditioning
    python tools/run_mutation.py --show-survivors      # with the diff of every survivor

Writes ``summary.json`` and ``summary.md`` (kill rate per module, survivors) to ``--workdir``.
Not part of CI. ``tox -e mutation`` passes ``--sample 250`` (at most 250 mutants per module, a
fixed hash-ordered sample): about 1,300 mutants at ~2 CPU-seconds each, under 30 minutes on 2
cores; ``--sample 0`` runs all ~3,100 (about an hour).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]          # files mutated (only_mutate)
    mutants: tuple[str, ...]          # mutant-name globs run (mutmut's naming)
    tests: tuple[str, ...]            # test files (or node ids) that cover them


GROUPS = (
    Group("targets", ("gnrev_plugin/optim/targets.py",),
          ("gnrev_plugin.optim.targets.*",),
          ("tests/optim/test_targets_oracle.py",)),
    Group("conditioning", ("gnrev_plugin/metrics/conditioning.py",),
          ("gnrev_plugin.metrics.conditioning.*",),
          ("tests/metrics/test_conditioning.py",)),
    Group("ntk", ("gnrev_plugin/metrics/ntk.py",),
          ("gnrev_plugin.metrics.ntk.*",),
          ("tests/metrics/test_ntk.py",)),
    # the NME kernels of hessian/operators.py (the summary and estimator plumbing is not core math)
    Group("nme", ("gnrev_plugin/metrics/hessian/operators.py",),
          ("gnrev_plugin.metrics.hessian.operators.x_nme_surrogate_dense*",
           "gnrev_plugin.metrics.hessian.operators.xǁSurrogateNMELinearOperatorǁ*"),
          ("tests/metrics/test_hessian.py", "tests/hosts/test_curvlinops.py")),
    Group("solvers", ("gnrev_plugin/optim/solvers/", "gnrev_plugin/optim/right_inverse.py",
                     "gnrev_plugin/optim/block_systems.py", "gnrev_plugin/optim/block_updates.py"),
          ("gnrev_plugin.optim.solvers.*", "gnrev_plugin.optim.right_inverse.*",
           "gnrev_plugin.optim.block_systems.*", "gnrev_plugin.optim.block_updates.*"),
          ("tests/optim/test_solvers.py", "tests/optim/test_solvers_grams.py",
           "tests/optim/test_exact_gn_dispatch.py", "tests/optim/test_exact_gn_dense_oracle.py",
           "tests/optim/test_exact_gn_residual.py", "tests/optim/test_exact_gn.py",
           "tests/optim/test_solvers_right_inverse.py")),
)

#: mutmut's exit-code → status table (mutmut/stats.py), folded into four outcomes.
def outcome(code) -> str:
    if code in (1, 3):
        return "killed"
    if code in (24, -24, 152, 255, 36):
        return "timeout"       # counted as killed: the mutant made the tests hang
    if code == 0:
        return "survived"
    if code is None:
        return "not run"
    if code in (5, 33):
        return "no tests"
    return "suspicious"


def copy_tree(dest: Path, ref: str | None) -> None:
    """The repository at ``ref`` (``git archive``) or the working tree, without build outputs."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if ref:
        data = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(dest, filter="data")
        return
    skip = {".git", ".venv", ".tox", "mutants", ".hypothesis", "__pycache__", ".mutation",
            "runs", "outputs", "build", "dist", ".pytest_cache", ".ruff_cache"}
    shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n in skip
                                             or n.endswith(".egg-info")])


def write_group_config(copy: Path, group: Group) -> None:
    """Replace ``[tool.mutmut]`` in the copy's pyproject with this group's modules and tests."""
    py = copy / "pyproject.toml"
    text = py.read_text()
    section = "\n".join([
        "[tool.mutmut]",
        'source_paths = ["gnrev_plugin"]',
        f"only_mutate = {json.dumps(list(group.modules))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(group.tests))}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]',
        'process_isolation = "forkserver"',
        # mutmut's wall timeout is half its CPU limit, (estimate + constant) · 15 · 2 s: with the
        # default constant of 1 s, a busy shared machine turns quick kills into "timeouts"
        "timeout_constant = 20.0",
        "",
    ])
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text).rstrip() + "\n\n" + section
    py.write_text(text)


def collect(copy: Path, group: Group) -> dict:
    """Per module: counts of each outcome over the group's mutant names, and the survivors."""
    out: dict = {}
    for module in group.modules:
        meta = copy / "mutants" / (module + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        rows = {k: outcome(v) for k, v in codes.items()
                if any(fnmatch.fnmatchcase(k, pat) for pat in group.mutants)}
        counts: dict[str, int] = {}
        for status in rows.values():
            counts[status] = counts.get(status, 0) + 1
        tried = sum(n for s, n in counts.items() if s != "not run")
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        out[module] = {"counts": counts, "tried": tried, "killed": killed,
                       "kill_rate": killed / tried if tried else None,
                       "survivors": sorted(k for k, s in rows.items()
                                           if s in ("survived", "no tests", "suspicious"))}
    return out


def sample_names(copy: Path, group: Group, n: int) -> list[str]:
    """A deterministic sample of ``n`` mutant names per module (ordered by a hash of the name)."""
    names = []
    for module in group.modules:
        meta = copy / "mutants" / (module + ".meta")
        keys = [k for k in json.loads(meta.read_text())["exit_code_by_key"]
                if any(fnmatch.fnmatchcase(k, pat) for pat in group.mutants)]
        keys.sort(key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        names += keys[:n]
    return names


def run_group(group: Group, workdir: Path, ref: str | None, max_children: int,
              show: bool, sample: int | None = None, reuse: bool = False) -> dict:
    copy = workdir / group.name
    if not (reuse and (copy / "mutants" / "mutmut-stats.json").exists()):
        copy_tree(copy, ref)
    write_group_config(copy, group)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYPOTHESIS_PROFILE="ci",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)
    env.pop("PYTHONPATH", None)
    base = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(copy / "mutmut.log", "w") as log:
        if sample:   # generate the mutants and the test stats, then run a sample of them
            subprocess.run([*base, "no-such-mutant-*"], cwd=copy, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
            names = sample_names(copy, group, sample)
            (copy / "sample.txt").write_text("\n".join(names) + "\n")
        proc = subprocess.run([*base, *(names if sample else group.mutants)], cwd=copy, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # CPU seconds over all mutmut processes: on a shared machine wall time overstates the cost;
    # cpu_seconds / cores is the wall time on idle cores.
    result = {"group": group.name, "seconds": round(time.time() - t0), "cpu_seconds": round(cpu),
              "returncode": proc.returncode, "modules": collect(copy, group), "copy": str(copy)}
    if show:
        for mod in result["modules"].values():
            mod["diffs"] = {}
            for name in mod["survivors"]:
                diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=copy,
                                      env=env, capture_output=True, text=True).stdout
                mod["diffs"][name] = diff
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| module | mutants run | killed (incl. timeouts) | survived | kill rate | wall min "
             "| CPU min |", "|---|---|---|---|---|---|---|"]
    tried = killed = 0
    for r in results:
        for module, m in r["modules"].items():
            tried += m["tried"]
            killed += m["killed"]
            rate = f"{100 * m['kill_rate']:.1f} %" if m["kill_rate"] is not None else "n/a"
            lines.append(f"| `{module}` | {m['tried']} | {m['killed']} | {len(m['survivors'])} "
                         f"| {rate} | {r['seconds'] / 60:.1f} | {r['cpu_seconds'] / 60:.1f} |")
    if tried:
        lines.append(f"| **all** | {tried} | {killed} | {tried - killed} | "
                     f"**{100 * killed / tried:.1f} %** | "
                     f"{sum(r['seconds'] for r in results) / 60:.1f} | "
                     f"{sum(r['cpu_seconds'] for r in results) / 60:.1f} |")
    for r in results:
        for m in r["modules"].values():
            for name in m["survivors"]:
                lines.append(f"\n### {name}\n")
                if m.get("diffs", {}).get(name):
                    lines.append("```diff\n" + m["diffs"][name].strip() + "\n```")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=",".join(g.name for g in GROUPS),
                    help="comma-separated: " + ", ".join(g.name for g in GROUPS))
    ap.add_argument("--ref", default=None, help="git ref to test as committed (default: the "
                    "working tree)")
    ap.add_argument("--workdir", type=Path,
                    default=Path(tempfile.gettempdir()) / "gnrev-mutation")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--show-survivors", action="store_true", help="add each survivor's diff")
    ap.add_argument("--sample", type=int, default=None, metavar="N",
                    help="run a deterministic sample of at most N mutants per module (the kill "
                    "rate is then over the sample); 0: every mutant")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an existing copy and its mutmut results in --workdir")
    args = ap.parse_args(argv)
    wanted = args.groups.split(",")
    unknown = set(wanted) - {g.name for g in GROUPS}
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for group in GROUPS:
        if group.name in wanted:
            print(f"mutation: {group.name} ...", flush=True)
            results.append(run_group(group, args.workdir / "groups", args.ref, args.max_children,
                                     args.show_survivors, args.sample, args.reuse))
            (args.workdir / "summary.json").write_text(json.dumps(results, indent=1))
            (args.workdir / "summary.md").write_text(markdown(results))
            print(markdown([results[-1]]).split("\n### ")[0], flush=True)
    print(markdown(results))
    print(f"mutation: reports in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
