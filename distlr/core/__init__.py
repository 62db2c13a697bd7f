"""The pure math of a range test: numbers in, numbers out.

The arguments and their checks (``options``), the LR ladder, the smoothing and the stop rule
(``smoothing``), the curve and its zero-lag trend (``curve``), the suggestion rules (``rules``),
the one function that builds a result (``analysis``), the schedules (``schedule``), the
batch-size fits (``scaling``), a series' runs and what they say (``series``) and the result
itself (``result``). numpy only: no
torch, no torch.distributed, no logging, no files (``tests/test_layers.py`` checks it).
"""
