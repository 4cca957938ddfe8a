"""The `medfed` command line: the composition root, which may import every package."""
