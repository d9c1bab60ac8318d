#!/usr/bin/env bash
# One full benchmark run into OUTDIR: a JSON file and a PNG plot per benchmark, each carrying
# the machine and date. Then `python tools/report.py --readme README.md OUTDIR` writes the
# README's generated section from it. Root is needed for the emulated links (namespaces, tc);
# run it on a quiet machine: ranks share the host's cores. About 30-40 minutes on 2 cores.
#
#   sudo -E env PATH="$PATH" tools/run_benchmarks.sh bench-results/run
set -euo pipefail

out=${1:?usage: tools/run_benchmarks.sh OUTDIR}
if [ "$(id -u)" -ne 0 ]; then
    echo "run_benchmarks: the 1gbit/10gbit runs need root (network namespaces and tc)" >&2
    exit 2
fi
mkdir -p "$out"

bench() {
    local name=$1
    shift
    echo "+ sparsecoll-bench $* ($name)" >&2
    sparsecoll-bench "$@" --json "$out/$name.json" --plot "$out/$name.png" || failed+=("$name")
}
failed=()

sparse_algorithms=dense,gloo,allgather,gtopk,cltk

# dense collectives against Gloo on loopback, nccl-tests sizes
bench 01-collectives-loopback collectives --ranks 4 -b 1K -e 256M -f 4 --ops allreduce --algorithms dense,gloo
# every algorithm over 1 and 10 Gbit/s links: where sparse overtakes dense, and what quantization adds
for rate in 1gbit 10gbit; do
    bench "02-collectives-$rate" collectives --ranks 4 -b 64K -e 64M -f 4 --link "$rate" \
        --algorithms "$sparse_algorithms,sketch" --density 0.001
done
bench 03-collectives-quantized-1gbit collectives --ranks 4 -b 1M -e 64M -f 8 --link 1gbit \
    --algorithms dense,gloo,allgather,gtopk --density 0.001 --quantize-bits 0,8
# the ResNet-50-sized gradient: 25M float32 at 0.1%, 4 ranks, then the scaling in P; each link's
# cost model is calibrated first, so the auto table shows how far algorithm="auto" is from the best
for rate in 1gbit 10gbit; do
    sparsecoll-bench calibrate --ranks 4 --link "$rate" -o "$out/cost-model-$rate.json" || failed+=("calibrate-$rate")
    SPARSECOLL_COST_MODEL="$out/cost-model-$rate.json" \
        bench "04-sparse-25M-$rate" sparse --ranks 4 -d 25M --density 0.001 --link "$rate" -n 10
done
SPARSECOLL_COST_MODEL="$out/cost-model-1gbit.json" bench 05-sparse-25M-1gbit-scaling sparse --ranks 2,4,8 -d 25M --density 0.001 --link 1gbit \
    --algorithms "$sparse_algorithms"
bench 06-kernels kernels
bench 07-train-mnist train --dataset mnist --ranks 4 --epochs 30

if [ ${#failed[@]} -gt 0 ]; then
    echo "run_benchmarks: failed: ${failed[*]}" >&2
    exit 1
fi
echo "done; now: python tools/report.py --readme README.md $out" >&2
