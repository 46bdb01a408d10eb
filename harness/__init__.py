"""Benchmark and ablation harness for knowledge amalgamation (KA).

See README.md for the concepts (study, split, teacher, method, variant, trial) and
``docs/methods.md`` for the method specification.
"""

__version__ = "0.1.0"
