#!/usr/bin/env bash
# The GPU check in one call (sparsecoll/bench/gpu_check.py says what it runs), for a lent GPU
# machine: at most 8 minutes in all, set-up included; every step has its own timeout.
#
#   tools/gpu_check.sh             on the GPU machine, from any directory
#   tools/gpu_check.sh --dry-run   anywhere without a GPU: simulator, host arrays, device rows skipped
#   (other arguments go to sparsecoll.bench.gpu_check: --steps, --budget, --out, --jobs)
#
# Set-up, offline: the wheels in .whl/ (tools/gpu_wheels.sh fetches ucxx-cu13 and its libraries
# beforehand; carry .whl) go into a private site folder; sparsecoll runs from this tree
# (PYTHONPATH), with sparsecoll/kernels linked to kernels/ where the copy lost the link. A dry
# run changes nothing: it uses the package as installed where it runs (CI's editable install).
# Rows go to stdout and, when $OUT or --out is set, gpu_check.{json,md,log} and
# gpu_check_steps.log (every step's whole output, pytest's included) are written there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
started=$SECONDS
total_s=${GPU_CHECK_TOTAL_S:-480}
python=${PYTHON:-python3}
dry_run=0
for argument in "$@"; do [ "$argument" = --dry-run ] && dry_run=1; done
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi

GPU_CHECK_SETUP="no .whl folder: ucxx must already be importable"
if [ "$dry_run" = 1 ]; then
    GPU_CHECK_SETUP="dry run: the Python that runs this script, as installed (no link, no wheels)"
else  # a copied tree has no installed package: sparsecoll.kernels is kernels/ through a link
    [ -e sparsecoll/kernels ] || ln -s ../kernels sparsecoll/kernels || { echo "cannot link sparsecoll/kernels" >&2; exit 2; }
fi
if [ "$dry_run" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=${GPU_CHECK_SITE:-/tmp/sparsecoll-gpu-site}
    if log=$(timeout 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" .whl/*.whl 2>&1); then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        GPU_CHECK_SETUP="installed $(ls .whl/*.whl | wc -l) wheels from .whl into $site in $((SECONDS - started)) s"
    else
        GPU_CHECK_SETUP="the wheels in .whl did not install: ${log: -300}"
    fi
fi
export GPU_CHECK_SETUP
echo "setup: $GPU_CHECK_SETUP"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=$(( total_s - (SECONDS - started) - 20 ))  # 20 s for the table, the reports and exits
timeout -k 5 $(( budget + 15 )) "$python" -m sparsecoll.bench.gpu_check --budget "$budget" "$@"
