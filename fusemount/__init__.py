"""fusemount: FUSE daemons on pyfuse3 and trio (the union filesystem, the thin-device file)."""
