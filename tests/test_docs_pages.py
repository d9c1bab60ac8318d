"""The user guides exist, are in the table of contents, and say what a new user needs; their
code blocks are not clipped by the theme. (tests/test_docs.py builds them with -W.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = {
    "getting_started": ['pip install "torch==2.13.0" -e ".[examples]"', "``ucx``", "sparsecoll-bench demo",
                        "init_sync_group", "LoopThreadError"],
    "training": ["SparseCollOptimizer", "last_stats", "total_stats", "GradScaler", "grad_scaler=scaler",
                 "opt.state_dict()", "register_comm_hook", "warmup_steps"],
    "choosing": ["sparsecoll-bench calibrate", "list-table", "dense", "When it is slower than dense",
                 "calibrates itself", "sparsecoll-bench sparse"],
    "multinode": ["torchrun --nnodes 2", "SPARSECOLL_HOST", "SPARSECOLL_PORT_RANGE=29500-29600",
                  "--no-python sparsecoll-bench demo", "SPARSECOLL_SECRET"],
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_guide_is_listed_and_covers_its_subject(page: str) -> None:
    toctree = (DOCS / "index.rst").read_text().split(".. toctree::", 1)[1]
    assert re.search(rf"^   {page}$", toctree, re.M), f"{page} is not in the toctree"
    text = (DOCS / f"{page}.rst").read_text()
    for needed in PAGES[page]:
        assert needed in text, (page, needed)


def test_code_blocks_scroll_instead_of_being_clipped() -> None:
    conf = (DOCS / "conf.py").read_text()
    assert '"custom.css"' in conf and '"_static"' in conf
    assert "overflow-x: auto" in (DOCS / "_static" / "custom.css").read_text()
