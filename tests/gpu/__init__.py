"""GPU checks (``pytest -m gpu``): the CUDA paths on a real GPU, skipped where CUDA is absent."""
