"""Every Python example of the README (and of docs/deployment.md and docs/ops.md) runs as pasted."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples(name):
    text = (ROOT / name).read_text()
    return [m.group(1) for m in FENCE.finditer(text)]


CASES = [(name, i, code) for name in ("README.md", "docs/deployment.md", "docs/ops.md") for i, code in enumerate(_examples(name))]


def test_the_readme_has_examples():
    assert any(name == "README.md" for name, _, _ in CASES)


@pytest.mark.parametrize("name,index,code", CASES, ids=[f"{n}#{i}" for n, i, _ in CASES])
def test_example_runs_as_pasted(name, index, code, tmp_path):
    pytest.importorskip("onnx")  # the deployment examples export ONNX
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} example {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
