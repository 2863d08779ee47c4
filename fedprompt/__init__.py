"""fedprompt: federated prompt learning on a frozen BiomedCLIP."""

__version__ = "0.1.0"
