"""The command line: its configuration (``config``), parsing (``parse``), and what it builds
from names and files (``build``: the model and optimizer; ``corpus``: the data)."""
