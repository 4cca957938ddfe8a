"""medfed: federated learning for hospitals, one medical-imaging classifier trained without moving an image.

Everything installs under this one import package while the repository keeps its top-level folders (setuptools
``package-dir`` maps ``medfed.client`` to ``client/``, ``medfed.common`` to ``common/`` and so on):

- ``medfed.common``: the shared core (config, data, models, metrics, wire keys, errors); imports no other part;
- ``medfed.client``: the hospital side (Flower ClientApp, training, privacy, the daemon and gate);
- ``medfed.strategies``: aggregation strategies on top of Flower's;
- ``medfed.server``: the coordinator side (ServerApp, run tracking, the daemon);
- ``medfed.simulation``: local federations in Flower's simulation runtime and the baselines;
- ``medfed.cli``: the ``medfed`` command.

Importing this package does no work: no I/O, no torch, no Flower.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("medfed")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
