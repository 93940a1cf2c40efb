"""The README's two commands are what CI runs and what a user types."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _bash_blocks()[1]
    assert "pytest" in test_cmd and "[test,corpora,hf]" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert test_cmd in ci


def test_first_command_installs_and_trains():
    first = _bash_blocks()[0]
    assert "pip install -e ." in first and "fastcram train" in first
