"""Random but valid darknet weights for a parsed cfg (shared by the model and decoder tests)."""

from __future__ import annotations

import numpy as np

from model_store.tools import darknet


def random_weights_file(network: darknet.Network, rng: np.random.Generator, *, conv_std: float,
                        seen: int = 0) -> bytes:
    """A .weights file body: header (version 0.2.5, ``seen``), then per conv layer bias, BN and kernels."""
    floats = []
    for layer in network.layers:
        if isinstance(layer, darknet.Convolutional):
            n, c, k = layer.filters, network.input_shape(layer.index).c, layer.size
            floats.append(rng.normal(0, 0.1, n))
            if layer.batch_normalize:
                floats += [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
            floats.append(rng.normal(0, conv_std, n * c * k * k))
    header = np.asarray([0, 2, 5], "<i4").tobytes() + np.asarray([seen], "<i8").tobytes()
    return header + np.concatenate(floats).astype("<f4").tobytes()
