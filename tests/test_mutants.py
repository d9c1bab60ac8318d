"""tools/mutate.py's mutants still apply: every snippet occurs exactly once, every test file exists.

Running the mutants is slow and not part of the suite (``python tools/mutate.py``); this guard
keeps the list from rotting silently when the code it mutates is edited.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_mutate():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutate", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["mutate"])
    return sys.modules["mutate"]


def test_every_mutant_snippet_exists_verbatim_once() -> None:
    mutate = load_mutate()
    assert len(mutate.MUTANTS) >= 6
    assert mutate.missing_snippets(ROOT) == []


def test_a_rotten_snippet_is_reported(tmp_path: Path) -> None:
    mutate = load_mutate()
    first = mutate.MUTANTS[0]
    (tmp_path / first.path).parent.mkdir(parents=True)
    (tmp_path / first.path).write_text("nothing to mutate here\n")
    problems = mutate.missing_snippets(tmp_path, (first,))
    assert any("occurs 0 times" in problem for problem in problems)
    assert any("does not exist" in problem for problem in problems)
