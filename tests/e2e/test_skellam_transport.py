"""Integers ride Flower's real SecAgg+ unchanged (issue 20): three simulated nodes send known integer vectors with
the settings of :class:`medfed.common.skellam.IntegerTransport` through Flower's client mod and server workflow;
the coordinator's decoded sum is the exact integer sum, at the edges of the range too, and what lay outside the range
was clipped and counted, not wrapped around the modulus."""

from __future__ import annotations

import numpy as np
from medfed.common.environment import flower_environment


def test_integers_go_through_secagg_plus_exactly_and_overflow_is_counted() -> None:
    flower_environment()
    from flwr.simulation import run_simulation

    from tests import secagg_transport_app as app

    app.RECEIVED.clear()
    run_simulation(server_app=app.server, client_app=app.client, num_supernodes=app.HOSPITALS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}})

    assert app.RECEIVED["active"] == app.HOSPITALS and app.RECEIVED["failures"] == 0
    sent = [app.integers(p) for p in range(app.HOSPITALS)]
    bound = app.TRANSPORT.bound
    expected = sum(np.clip(s, -bound, bound) for s in sent)
    assert app.TRANSPORT.decode(app.RECEIVED["mean"], app.HOSPITALS).tolist() == expected.tolist()
    assert expected[0] == app.HOSPITALS * bound  # the top edge of every node at once did not wrap
    assert app.RECEIVED["overflow"] == sum(int(np.count_nonzero(np.abs(s) > bound)) for s in sent) == 2
