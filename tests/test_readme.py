"""The README's two set-up commands stay true: CI runs exactly the test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    report_cmd, test_cmd = _commands()
    assert report_cmd.endswith("labkit report")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.replace(" -q", "") for line in ci]
    assert "pytest" in test_cmd
