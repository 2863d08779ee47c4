"""Flower apps and their helpers: the only part of fedprompt that imports ``flwr``."""
