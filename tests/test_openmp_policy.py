"""`import meddinov3_hf` makes OpenMP threads wait passively (the cause of the demo's CPU time on busy machines),
unless the user chose a policy or torch was already loaded (then it is too late and nothing is changed)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = "import os, sys; {first}import meddinov3_hf; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(first: str = "", **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    result = subprocess.run([sys.executable, "-c", CODE.format(first=first)], capture_output=True, text=True,
                            env=environment, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_import_sets_passive_wait_policy_unless_the_user_chose_one():
    assert _policy() == "PASSIVE"
    assert _policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _policy(first="import torch; ") == "None"  # torch's OpenMP runtime already read its environment
