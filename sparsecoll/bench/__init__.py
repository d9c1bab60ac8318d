"""sparsecoll-bench: microbenchmarks of collectives and kernels."""
