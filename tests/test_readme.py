"""README, install and CI cannot drift apart: .ci/run runs exactly the README's two quick-start commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_install_demo_and_install_test_commands() -> None:
    assert quick_start_commands() == ["pip install -e . && dify-batch demo", "pip install -e '.[test]' && python -m pytest -q"]


def test_ci_runs_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    demo, tests = quick_start_commands()
    assert demo in ci  # CI adds --no-progress after it, nothing else
    assert tests in ci.splitlines()
