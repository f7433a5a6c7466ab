"""The server runtime stays lean: serving never imports the export stack."""

import subprocess
import sys

SERVER_MODULES = (
    "halflife.cli",
    "halflife.api.server",
    "halflife.interest.engine",
    "halflife.embedding.engine",
    "halflife_client",
    "halflife.loadtest",
)


def test_serving_does_not_import_torch_or_transformers():
    code = (
        "import importlib, sys\n"
        f"for name in {SERVER_MODULES!r}: importlib.import_module(name)\n"
        "from halflife.cli import build_parser; build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"server imports {result.stdout.strip()}"


def test_cpu_and_gpu_runtimes_are_never_installed_together():
    """onnxruntime and onnxruntime-gpu install the same module: only the cpu
    or the gpu extra brings one, never the base dependencies."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    name = lambda spec: re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].lower()
    base = {name(d) for d in project["dependencies"]}
    extras = {extra: {name(d) for d in deps} for extra, deps in project["optional-dependencies"].items()}
    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    assert not base & runtimes
    assert extras["cpu"] & runtimes == {"onnxruntime"} and extras["gpu"] & runtimes == {"onnxruntime-gpu"}
    assert all(not deps & runtimes for extra, deps in extras.items() if extra not in ("cpu", "gpu"))
