"""Baseline KA methods. They register into harness's method registry through the
``harness.methods`` entry-point group in pyproject.toml; harness never imports this package."""
