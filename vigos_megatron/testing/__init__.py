"""Support code for tests, benchmarks and the demo (tiny models, gloo process groups)."""
