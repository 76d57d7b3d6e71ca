"""The conformance checks, one module per area of the Driver contract.

Collect them with ``pytest --pyargs graphdrivers.conformance.checks --gd-driver SPEC``; their
fixtures come from :mod:`graphdrivers.conformance.fixtures` through this package's conftest.
"""
