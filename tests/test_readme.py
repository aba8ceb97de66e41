"""The README's Python examples work when pasted (run in order, in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_FILES = "# (needs the downloaded checkpoint files)"


def python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if not b.startswith(NEEDS_FILES)]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})
    assert (tmp_path / "runs" / "my_vmoe" / "model.safetensors").is_file()
    assert (tmp_path / "capacity_sweep.png").is_file()
