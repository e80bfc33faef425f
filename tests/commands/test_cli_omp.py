"""``gnrev`` makes OpenMP's idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose.

The OpenMP runtime reads the variable once, when torch loads it, so the CLI must set it before
anything imports torch (``gnrev_plugin/cli.py``). Spinning threads made the README's job 6×
slower on 2 cores shared with one busy process (measured: 101 s against 17 s).
"""

import os
import subprocess
import sys

PROBE = ("import sys, os; import gnrev_plugin.cli; "
         "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")


def _probe(env_policy: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.split()


def test_the_cli_sets_passive_before_torch_is_loaded():
    # PASSIVE is set, and torch is not yet imported, so the OpenMP runtime will read it
    assert _probe(None) == ["PASSIVE", "False"]


def test_a_users_own_wait_policy_is_kept():
    assert _probe("ACTIVE") == ["ACTIVE", "False"]
