"""Only gradient-reduction algorithms are accepted by name: the registry's other entries ("reduce",
"lazy", "quantized-broadcast") would silently run something else."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sparsecoll.collectives.reduce import BUILTIN, NOT_ALGORITHMS, reduce_gradient
from sparsecoll.errors import InvalidArgumentError
from sparsecoll.torch.exchange import Compression


@pytest.mark.parametrize("name", sorted(NOT_ALGORITHMS))
def test_registry_entries_that_are_not_algorithms_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="not a gradient-reduction algorithm"):
        Compression(name).validate()
    with pytest.raises(InvalidArgumentError, match="not a gradient-reduction algorithm"):
        asyncio.run(reduce_gradient(None, np.ones(8, np.float32), name, density=0.5))


@pytest.mark.parametrize("name", [*BUILTIN, "auto"])
def test_the_public_algorithms_are_accepted(name: str) -> None:
    Compression(name).validate()
