"""``medfed coordinator|hospitals|train|runs`` (the coordinator) and ``medfed hospital`` (a site): real deployments.

Coordinator::

    medfed coordinator init --dir coord --host coordinator.example.org     # CA + SuperLink certificate
    medfed coordinator start --dir coord --address 0.0.0.0:9093             # the SuperLink (TLS, node auth)
    medfed coordinator renew-cert --dir coord --host coordinator.example.org  # new server cert, same CA
    medfed hospitals register node.pub --dir coord --name hospital-a
    medfed hospitals unregister NODE_ID --dir coord
    medfed train --dir coord dataset=medmnist dataset.name=pneumoniamnist train.rounds=20
    medfed runs list|logs RUN_ID|stop RUN_ID --dir coord

Hospital::

    medfed hospital init --dir site --site-id hospital-a --data-path images.npz --n-classes 2 \\
        --superlink coordinator.example.org:9093 --ca ca.crt --max-epsilon 8
    medfed hospital approve --config site/site.yaml        # this installation's app bundle
    medfed hospital start --config site/site.yaml
    medfed hospital audit --config site/site.yaml

The command groups live in their own modules: ``coordinator`` (coordinator, hospitals), ``runs`` (train, runs),
``hospital`` and ``hospital_tools`` (hospital); ``coordination`` holds what they share about a coordinator
directory.
"""

from __future__ import annotations

import logging

import typer

from medfed.cli.coordinator import coordinator_app, hospitals_app
from medfed.cli.display import make_console
from medfed.cli.hospital import hospital_app
from medfed.cli.runs import runs_app, train

__all__ = ["register_commands"]

logger = logging.getLogger(__name__)

console = make_console()


def show_bundle_hash() -> None:
    """The sha256 of the app bundle this installation builds and `medfed train` submits: the coordinator announces
    it, and each hospital approves it (`medfed hospital approve --sha256 ...`) after checking its own matches."""
    from medfed.cli.bundle import bundle_hash

    console.print(bundle_hash(), highlight=False)


def register_commands(app: typer.Typer) -> None:
    """Add the deployment commands to the ``medfed`` command."""
    app.command("bundle-hash")(show_bundle_hash)
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(hospitals_app, name="hospitals")
    app.add_typer(runs_app, name="runs")
    app.add_typer(hospital_app, name="hospital")
    app.command("train")(train)
