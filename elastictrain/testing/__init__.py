"""Helpers for tests, the demo and benchmarks: the toy task (`toy`) and fault injection (`faults`).

Not needed to train; imported by name (`from elastictrain.testing.toy import ToyTask`).
"""
