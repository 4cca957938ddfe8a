"""A minimal Flower app pair that sends integer vectors through Flower's real SecAgg+ protocol with the settings of
:class:`medfed.common.skellam.IntegerTransport` (tests/e2e/test_skellam_transport.py): each node sends known
integers, and the ServerApp keeps the mean the workflow hands its strategy, so that the test can check the decoded
integer sum against the exact one."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from medfed.common.skellam import IntegerTransport

HOSPITALS = 3
MAX_WEIGHT = 100.0
TRANSPORT = IntegerTransport(HOSPITALS, modulus_range=2**16)  # a small modulus, so that the range's edge is near
RECEIVED: dict[str, Any] = {}


def integers(partition: int) -> np.ndarray:
    """What node ``partition`` sends: values at the range's edges, negative ones, and one outside it."""
    bound = TRANSPORT.bound
    return np.array([bound, -bound, partition - 1, -7 * partition, bound - partition, bound + 10 * partition],
                    dtype=np.int64)


class _Sender(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict]:
        floats, overflow = TRANSPORT.encode(integers(self.partition))
        # num_examples == max_weight: the SecAgg+ mod's weighting ratio is then exactly 1
        return [floats], int(MAX_WEIGHT), {"overflow": overflow}


def _client_fn(context: Context) -> Any:
    return _Sender(int(context.node_config["partition-id"])).to_client()


client = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


class _Keep(FedAvg):
    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        RECEIVED["mean"] = parameters_to_ndarrays(results[0][1].parameters)[0]
        RECEIVED["active"] = len(results)
        RECEIVED["failures"] = len(failures)
        RECEIVED["overflow"] = sum(int(res.metrics["overflow"]) for _, res in results)
        return super().aggregate_fit(server_round, results, failures)


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    strategy = _Keep(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=HOSPITALS,
                     min_available_clients=HOSPITALS)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=HOSPITALS, reconstruction_threshold=2, max_weight=MAX_WEIGHT,
        clipping_range=TRANSPORT.clipping_range, quantization_range=TRANSPORT.quantization_range,
        modulus_range=TRANSPORT.modulus_range,
    ))(grid, legacy)
