"""The web consoles: ``medfed hospital console`` (a site's own page: what left it, what it cost, the code it
approves, its data check and its Grad-CAM maps) and ``medfed coordinator console`` (hospitals, runs, live rounds).
A composition root like ``medfed.cli``: it may import every other part of medfed; nothing imports it but the CLI."""
