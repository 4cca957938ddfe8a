"""The hospital side of medfed: the Flower ClientApp, local training and site data."""
