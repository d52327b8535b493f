"""`benchmarks/gpu_check.py` runs on CPU at tiny sizes: the GPU figures come from the same script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu_prints_every_check(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = {(r["check"], r["setting"]) for r in report["rows"]}
    for precision in ("fp32", "bf16-mixed", "bf16-mixed + checkpointing"):
        assert ("grounding LoRA step", precision) in settings
    for precision in ("fp32", "fp16-mixed", "bf16-mixed"):
        assert ("diffusion LoRA step", precision) in settings
    assert {r["check"] for r in report["rows"]} >= {"embedding forward", "exact search top-10"}
    assert all("steps/s" in r["throughput"] or "/s" in r["throughput"] for r in report["rows"])
    assert "skipped: peak memory" in run.stdout and "finished in" in run.stdout
