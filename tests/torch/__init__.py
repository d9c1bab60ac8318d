"""Tests of sparsecoll.torch: buckets, error feedback, the optimizer, the DDP hook, convergence."""
