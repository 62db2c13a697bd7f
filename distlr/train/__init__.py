"""What every backend shares to train: batches to the device and the loss of any model
(``batch``), reading loaders (``data``), and the state put back afterwards (``snapshot``)."""
