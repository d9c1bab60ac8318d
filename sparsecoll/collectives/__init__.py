"""Collective algorithms, one module per family, written on :class:`sparsecoll.call.Call`."""
