"""The README's two opening commands are what users and CI run; keep them honest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_the_main_job_and_the_test_command():
    main_job, tests = _readme_commands()[:2]
    assert "-c constraints.txt" in main_job and "raydae run --preset shapes" in main_job
    assert "-c constraints.txt" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    tests = _readme_commands()[1]
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_constraints_pin_the_tested_pair():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins and "ray==2.60.0" in pins
