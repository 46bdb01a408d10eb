"""Benchmark and ablation harness for knowledge amalgamation (KA).

See README.md for the concepts (study, split, teacher, method, variant, trial) and
``../shared/design/cka-spec.md`` for the method contract.
"""

__version__ = "0.1.0"
