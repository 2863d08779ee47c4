"""fedprompt: federated prompt learning on a frozen BiomedCLIP."""

from fedprompt.terminal import print_unprinted_records

__version__ = "0.1.0"

# Before any library that configures logging on import: each log line is printed once.
print_unprinted_records()
