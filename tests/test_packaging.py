"""Packaging: serving never imports the export stack, and only the commands that run the model need
onnxruntime, which the base package lacks."""

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


# The model's runtime, which the base package lacks (the cpu or gpu extra
# brings it), and the export stack (the export extra).
EXPORT_STACK = ("torch", "transformers", "optimum", "onnx")
MODEL_STACK = ("onnxruntime", *EXPORT_STACK)
# `halflife ARGS...` run as `python -c UNINSTALLED MODULES ARGS...`: importing
# the comma-separated MODULES, or any of their submodules, fails.
UNINSTALLED = """
import sys

class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in sys.argv[1].split(","):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Uninstalled())
from halflife.cli import main
sys.exit(main(sys.argv[2:]))
"""


def halflife_without(modules: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", UNINSTALLED, ",".join(modules), *args], capture_output=True,
                          text=True, timeout=120)


def test_help_and_client_commands_need_no_model_runtime(tmp_path):
    """Every command died in a ModuleNotFoundError traceback, --help too:
    building the parser imported the servicers, and they onnxruntime."""
    for args in (["--help"], ["serve", "--help"]):
        result = halflife_without(MODEL_STACK, *args)
        assert result.returncode == 0 and "usage: halflife" in result.stdout, result.stderr
    recommend = halflife_without(MODEL_STACK, "recommend", "1", "--target", "127.0.0.1:1")  # nothing listens there
    assert recommend.returncode == 1, recommend.stderr
    assert recommend.stderr.startswith("halflife recommend: error: UNAVAILABLE: "), recommend.stderr
    assert len(recommend.stderr.strip().splitlines()) == 1, recommend.stderr
    load = halflife_without(MODEL_STACK, "load-movielens", str(tmp_path / "nowhere"), "--target", "127.0.0.1:1")
    assert load.returncode == 1, load.stderr
    assert load.stderr.startswith(f"halflife load-movielens: error: {tmp_path / 'nowhere'}: not a directory;")


def test_vacuum_needs_no_model_runtime(tmp_path):
    """It runs no model, but took the data directory through the server's
    module, which imports onnxruntime: without a runtime it died in a
    ModuleNotFoundError traceback, a missing store's one line too."""
    from halflife.storage.sqlite import SqliteStore

    missing = halflife_without(MODEL_STACK, "vacuum", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.startswith("halflife vacuum: error: "), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    SqliteStore(tmp_path / "data").close()
    vacuumed = halflife_without(MODEL_STACK, "vacuum", "--data-dir", str(tmp_path / "data"))
    assert vacuumed.returncode == 0 and vacuumed.stdout.startswith("vacuumed "), vacuumed.stderr


def test_the_commands_that_run_the_model_name_the_extra_that_brings_its_runtime(tmp_path):
    """serve's line was never reached (see above); export blamed its own
    extra, and eval failed in a traceback once it came to embed."""
    for command, *args in (
        ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        ["export", "--output", str(tmp_path / "model")],
        ["eval", "--data", str(tmp_path / "ml"), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
    ):
        result = halflife_without(MODEL_STACK, command, *args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == (f"halflife {command}: error: onnxruntime is not installed: pip install "
                                         "'halflife[cpu]' (or 'halflife[gpu]' on a CUDA machine)"), result.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was made


def test_export_names_the_extra_of_a_missing_export_stack(tmp_path):
    """Its line was never reached: the export imports the stack where it
    uses it, so torch missing was a traceback from the export's first step."""
    result = halflife_without(EXPORT_STACK, "export", "--output", str(tmp_path / "model"))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("halflife export: error: the export stack is not installed (torch); install it "
                                     "with `pip install 'halflife[export]'` (or `make install`)"), result.stderr
    assert not list(tmp_path.iterdir())


def test_make_exports_the_bundled_model_again_but_never_over_another_model(tmp_path):
    """`make serve MODEL_DIR=var/models/mine` (README: the directory every
    target serves) replaced an exported model of one's own with the bundled
    one with --force once the export sources were newer than its manifest (a
    `git pull`, or a model copied with its times kept): its server then
    refused the store reembedded for it (a model-upgrade review)."""
    import json
    import os
    import shutil
    from pathlib import Path

    import pytest

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / ".installed").touch()  # newer than pyproject.toml: nothing is installed
    calls = tmp_path / "calls"
    (bin_dir / "halflife").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "halflife").chmod(0o755)
    bundled = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    from halflife_export.exporter import BUNDLED_WEIGHTS_SHA256

    assert bundled == BUNDLED_WEIGHTS_SHA256  # the Makefile's copy

    def make_model(weights_sha256: str) -> subprocess.CompletedProcess:
        model = tmp_path / weights_sha256[:8]
        model.mkdir()
        manifest = model / "manifest.json"
        manifest.write_text(json.dumps({"source": {"weights_sha256": {"model.safetensors": weights_sha256}}}))
        os.utime(manifest, (0, 0))  # older than the export sources
        result = subprocess.run(["make", "-C", str(repo), "model", f"VENV={tmp_path / 'venv'}", f"MODEL_DIR={model}"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result

    result = make_model("0" * 64)
    assert not calls.exists() and "holds another model than the bundled one" in result.stdout, result.stdout
    make_model(bundled)
    assert calls.read_text() == f"export --output {tmp_path / bundled[:8]} --force\n"
