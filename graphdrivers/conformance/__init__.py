"""The conformance suite: one set of checks every graph driver must pass."""
