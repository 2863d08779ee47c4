"""FedAdam whose global prompt keeps the dtype the sites send (Flower's drifts to float64)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam


class FedAdam(FlowerFedAdam):
    """Flower's FedAdam (Reddi et al., ICLR 2021), with the aggregate cast back to the sent dtype.

    Flower's step adds float64 numpy scalars to the float32 prompt, so from round 2 on every site
    would receive (and the checkpoint would hold) float64 tensors twice the size, and update
    validation would refuse the sites' float32 replies as the wrong dtype.
    """

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the dtypes sent, then Flower's FedAdam."""
        self._dtypes = {key: np.dtype(array.dtype) for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAdam step, returned in the dtypes of the arrays this round sent."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        cast = {
            key: Array(np.asarray(array.numpy(), dtype=self._dtypes[key]))
            for key, array in arrays.items()
        }
        return ArrayRecord(cast), metrics
