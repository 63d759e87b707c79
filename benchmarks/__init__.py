"""The benchmarks of elastictrain, run from a source checkout: `python -m benchmarks list`."""
