"""Kernel microbenchmarks and the end-to-end step benchmark (driven by `fastcram bench ...`)."""
