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
