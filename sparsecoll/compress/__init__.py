"""Codecs on arrays (numpy or CUDA): top-k, threshold, random-k, quantize, count sketch.

Each codec turns a flat array into a payload of arrays (``encode``) and back (``decode``); they
use ``sparsecoll.kernels`` and know nothing of sockets or torch.
"""

from .payload import QuantizedPayload, SparsePayload, densify
from .quantize import ParameterQuantizer, QuantizeCodec
from .randomk import RandomKCodec
from .sketch import CountSketchCodec
from .threshold import ThresholdCodec
from .topk import TopKCodec, k_for_density

__all__ = [
    "CountSketchCodec",
    "ParameterQuantizer",
    "QuantizeCodec",
    "QuantizedPayload",
    "RandomKCodec",
    "SparsePayload",
    "ThresholdCodec",
    "TopKCodec",
    "densify",
    "k_for_density",
]
