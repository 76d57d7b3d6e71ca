"""pytest plugin entry point of the conformance suite (registered as ``graphdrivers_conformance``)."""
