"""Simulated instruments (ophyd devices over pure physics functions) and training-data generators.

``simulators`` may import ``models``' pure helpers; never ``agents`` or ``streams``.
"""
