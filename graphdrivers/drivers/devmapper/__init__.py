"""The devicemapper driver: layers as thin devices of a thin pool (kernel or userspace)."""
