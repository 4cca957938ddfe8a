"""The coordinator side of medfed: the Flower ServerApp and run directories."""
