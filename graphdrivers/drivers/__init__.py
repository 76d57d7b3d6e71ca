"""The built-in drivers; :mod:`graphdrivers.registry` maps their names to classes."""
