"""Experiments on the synthetic benchmark: scripts that train, evaluate and write reports."""
