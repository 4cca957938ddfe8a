"""Local federations and their baselines on one machine: the simulation launcher (Flower's simulation runtime,
one virtual SuperNode per hospital) and the centralized and local-only baselines. A composition root below the
``medfed`` command: it may import client, server, strategies and common, never cli."""
