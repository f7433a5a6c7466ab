"""bench/gpu/bench.py, which runs on a lent GPU machine: what it can be checked for here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parents[1]


def test_it_imports_and_says_its_arguments_on_a_cpu_machine():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "bench.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--provider {cuda,cpu}" in out.stdout and "--quick" in out.stdout


def test_its_table_states_the_versions_it_ran_with():
    """bench/gpu/README.md has its table copied into bench/results/gpu.md: it
    named the onnxruntime version alone, not the PyTorch baseline's (torch,
    sentence-transformers) nor halflife's, which every other result states."""
    from bench.gpu.bench import markdown

    m = machine() | {"versions": {"halflife": "0.1.0", "torch": "2.9.0+cu130", "sentence-transformers": "6.0.0"}}
    table = markdown({"machine": m, "gpu": "NVIDIA H100, 580.1", "onnxruntime": "1.31.1",
                      "provider": "CUDAExecutionProvider", "variant": "fp16", "note": "", "accuracy": {},
                      "rows": [{"method": "ORT engine (fp16, in-process)", "batch": 32, "sentences_per_s": 9000.0}]})
    head = table.split("\n\n")[0]
    assert "Versions: halflife 0.1.0, torch 2.9.0+cu130, sentence-transformers 6.0.0." in head
    assert m["date"] in head and f"Python {m['python']}" in head
