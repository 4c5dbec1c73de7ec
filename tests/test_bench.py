"""The benchmarks cannot rot: bench/grpo.py and bench/sft.py run end to end in their smoke mode (tiny
sizes, one or two steps, our side only unless TRL is installed already), through the same calls
into rl.py, sft.py and trainer.py that the full runs make."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, expect", [("grpo.py", "ours (rl.py GRPO phases)"), ("sft.py", "ours (sft.py)")])
def test_bench_script_runs_in_smoke_mode(script, expect, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--smoke", "--trl-venv",
                          str(tmp_path / "no-trl")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith(expect))
    assert "skipped" not in line and float(line[len(expect):].split()[0]) > 0, line
    assert "TRL is not installed" in out.stdout  # the peer is said to be skipped, never installed
