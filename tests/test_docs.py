"""The documentation builds offline with warnings as errors, and covers the public API."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def test_docs_build_offline_with_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("Group.allreduce", "Group.allgather", "Group.send", "Group.recv", "Group.isend",
                 "Group.split", "Group.new_group", "Group.collective", "Group.run", "ANY_SOURCE",
                 "wait_all", "register_collective", "register_compressor", "SyncGroup",
                 "errors.PeerLostError", "launch.spawn"):
        assert f'id="sparsecoll.{name}"' in api, name
    tutorial = page_text(out / "tutorial.html")
    for code in ('register_collective("quantized-allreduce")', "async def serve(",
                 "await group.recv(sparsecoll.ANY_SOURCE, tag=GRADIENT)"):
        assert code in tutorial, code  # literalinclude found the examples
    assert "Failures are errors, never hangs" in page_text(out / "semantics.html")
