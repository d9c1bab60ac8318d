"""A GPU-check step for the tests (not collected: no ``test_`` prefix): it prints one row, then
either exits with status 3 or sleeps until the parent's step timeout kills it and its child."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

from sparsecoll.bench.gpu_check import OK, Row, emit


def main(argv: Sequence[str]) -> None:
    emit(Row(argv[0], "first", OK, "1 unit"))
    if argv[0] == "crash":
        print("the step broke here", flush=True)
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"child {child.pid}", flush=True)
    time.sleep(60)
