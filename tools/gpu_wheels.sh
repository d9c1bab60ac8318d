#!/usr/bin/env bash
# Fetch, here, the wheels tools/gpu_check.sh installs on the GPU machine, which has no network:
# ucxx-cu13 and its libraries for Python 3.12 on manylinux x86_64 (about 51 MB), into .whl/
# (git-ignored; name it in the device run's carry). The GPU machine already has their other
# requirements (cuda-core, cuda-bindings, nvidia-ml-py, numpy). A numpy 2.4 wheel (17 MB) does
# not fit beside them under the 64 MiB a run may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "ucxx-cu13==0.52.*" "libucxx-cu13==0.52.*" "libucx-cu13==1.21.*" \
    "rmm-cu13==26.10.*" "librmm-cu13==26.10.*" "rapids-logger==0.3.*"
du -sh .whl
