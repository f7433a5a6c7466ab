"""The Python examples of clients/python/README.md and README.md, run as
written, in order, against a live server with an empty store: a documented
call that no longer exists, or a `# prints: ...` comment that is no longer
what the example prints, fails here."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from halflife.api.server import ServerConfig
from tests.serving import ServerThread

ROOT = Path(__file__).resolve().parent.parent
# The address the examples name: `make serve`'s. They run against the test's server instead.
DOCUMENTED_TARGET = '"127.0.0.1:50051"'
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
PRINTS = re.compile(r"# (?:.*; )?prints: (.*)$")


def python_blocks(readme: Path) -> list[tuple[int, str]]:
    """(line number of its first line, code) for each ```python block."""
    text = readme.read_text()
    return [(text.count("\n", 0, block.start(1)) + 1, block[1]) for block in PYTHON_BLOCK.finditer(text)]


def expected_lines(code: str) -> list[str]:
    """What the block's `# prints: ...` comments say it prints, in order."""
    return [found[1].rstrip() for line in code.splitlines() if (found := PRINTS.search(line))]


def printed_in_order(expected: list[str], printed: list[str]) -> bool:
    """Whether `expected` are lines of `printed`, in that order (other lines,
    such as those of a loop over scores, may come between)."""
    lines = iter(printed)
    return all(any(line == want for line in lines) for want in expected)


@pytest.mark.parametrize("readme", ["clients/python/README.md", "README.md"])
def test_readme_python_examples_run_as_written(readme, model_dir, tmp_path):
    blocks = python_blocks(ROOT / readme)
    assert blocks, f"{readme} has no ```python block"
    namespace = {"__name__": "__readme__"}  # one session: later examples use the earlier ones' client
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path)) as server:
        for first_line, code in blocks:
            # Blank lines first, so that a traceback names the README's own line numbers.
            source = "\n" * (first_line - 1) + code.replace(DOCUMENTED_TARGET, f'"{server.address}"')
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                exec(compile(source, readme, "exec"), namespace)
            expected, printed = expected_lines(code), output.getvalue().splitlines()
            assert printed_in_order(expected, printed), (
                f"{readme}, the example at line {first_line}: expected (in order)\n{expected}\nprinted\n{printed}")
