"""The README's training example, as written, under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Training with PyTorch", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_trains_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(readme_example())
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(script)],
                         capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = sorted(re.findall(r"rank (\d): loss ([0-9.]+), (\d+) bytes", run.stdout))
    assert [rank for rank, _, _ in losses] == ["0", "1"], run.stdout
    assert all(float(loss) < 0.5 and int(sent) > 0 for _, loss, sent in losses), run.stdout
