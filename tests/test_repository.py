"""The repository's own promises: CI runs exactly the test command the README gives, in a new environment."""

import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```\s*\n(.+?)\n```\s*<!-- /test-command -->", readme, re.S)
    assert block, "README.md must give the test command between <!-- test-command --> markers"
    command = block.group(1).strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == command
    # ... inside a virtual environment it creates (without the machine's site-packages)
    venv = next(i for i, ln in enumerate(ci_lines) if ln.startswith("python3 -m venv"))
    activate = next(i for i, ln in enumerate(ci_lines) if ln.startswith("source") and "/bin/activate" in ln)
    assert venv < activate < len(ci_lines) - 1 and "--system-site-packages" not in ci_lines[venv]


def test_the_test_environment_holds_the_demo_environment():
    """tests/test_demo.py runs the README's demo without its install step: the demo extra must be part of the test
    extra, so the test command's install is also the demo's."""
    setup = (ROOT / "setup.py").read_text()
    extras = {name: set(re.findall(r'"([^"]+)"', body))
              for name, body in re.findall(r'"(\w+)":\s*\[([^\]]*)\]', setup)}
    assert extras["demo"] and extras["demo"] <= extras["test"], extras
