"""onnxruntime's own telemetry (a device id and events queued for upload under
~/.cache/Microsoft) stays off wherever halflife is imported, unless the
operator turns it on: halflife/__init__.py."""

import os
import subprocess
import sys

import pytest

TELEMETRY_DIR = (".cache", "Microsoft")


def imports_leave_telemetry(tmp_path, code: str, **env: str) -> bool:
    """Whether a fresh interpreter running `code` (with HOME in tmp_path, and
    none of the CI variables that onnxruntime takes as its own opt-out) left
    onnxruntime's telemetry store behind."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **env}
    if "PYTHONPATH" in os.environ:
        clean["PYTHONPATH"] = os.environ["PYTHONPATH"]
    subprocess.run([sys.executable, "-c", code], env=clean, check=True, timeout=120)
    return home.joinpath(*TELEMETRY_DIR).exists()


@pytest.mark.parametrize("code", [
    "import halflife.embedding.engine; import onnxruntime",
    "import halflife.cli; import onnxruntime",
    "import halflife_export.smoothquant; import onnxruntime",  # the export stack, imported on its own
])
def test_importing_halflife_turns_onnxruntimes_telemetry_off(tmp_path, code):
    assert not imports_leave_telemetry(tmp_path, code)


def test_an_operator_who_turns_it_on_gets_it(tmp_path):
    # Also shows that the probe sees telemetry where onnxruntime records it.
    assert imports_leave_telemetry(tmp_path, "import halflife; import onnxruntime", ORT_DISABLE_TELEMETRY="0")
