"""Running a user's script the way they run it: ``python script.py``, in its own directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_script(tmp_path: Path, source: str, *, files: dict[str, str] | None = None,
               timeout: float = 75) -> str:
    """Run ``source`` as ``python script.py`` in ``tmp_path`` (with ``files`` beside it);
    return its stdout, failing with its output if it exits non-zero."""
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"script failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout
