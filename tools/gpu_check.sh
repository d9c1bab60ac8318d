#!/usr/bin/env bash
# The GPU check in one call (sparsecoll/bench/gpu_check.py says what it runs), for a lent GPU
# machine: at most 8 minutes in all, set-up included; every step has its own timeout.
#
#   tools/gpu_check.sh             on the GPU machine, from any directory
#   tools/gpu_check.sh --dry-run   anywhere without a GPU: simulator, host arrays, device rows skipped
#
# Set-up, offline: the wheels in .whl/ (ucxx-cu13 and its libraries, shared/GPU.md; a numpy
# 2.4 wheel if numba.cuda needs one) go into a private site folder; sparsecoll runs from this
# tree (PYTHONPATH), with sparsecoll/kernels linked to kernels/ where the copy lost the link.
# Rows and reports go to stdout and, when $OUT or --out is set, to gpu_check.{json,md} there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
started=$SECONDS
total_s=${GPU_CHECK_TOTAL_S:-480}
python=${PYTHON:-python3}
dry_run=0
for argument in "$@"; do [ "$argument" = --dry-run ] && dry_run=1; done

[ -e sparsecoll/kernels ] || ln -s ../kernels sparsecoll/kernels || { echo "cannot link sparsecoll/kernels" >&2; exit 2; }
if [ "$dry_run" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=${GPU_CHECK_SITE:-/tmp/sparsecoll-gpu-site}
    if timeout 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "SETUP: the wheels in .whl/ did not install; steps that need them will say SKIP" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=$(( total_s - (SECONDS - started) - 20 ))  # 20 s for the table, the reports and exits
exec timeout -k 5 $(( budget + 15 )) "$python" -m sparsecoll.bench.gpu_check --budget "$budget" "$@"
