"""Benchmarks of acon_cuda (run with ``python -m benchmarks`` or ``make bench``).

The main benchmark, by what it measures:

- ``op_cases``: the acon op, forward, backward and forward+backward, against
  the paper's code, the reference, torch.compile and F.silu;
- ``meta_modules``: the Meta-ACON modules in training mode;
- ``training``: SGD steps of torchvision models with ACON;
- ``report``: results.json (provenance included), the tables (table.txt) and
  speedup.png; ``readme`` puts a run's report into README.md;
- ``cli``: the command line of ``python -m benchmarks``; ``timing``, ``paper``
  and ``progress``: what they share.

``probes``: one-off measurements behind single decisions, each run as
``python -m benchmarks.probes.<name>``.
"""
