"""The ``graphdrivers`` command line: one module per verb."""
