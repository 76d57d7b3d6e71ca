"""File-tree primitives the drivers share: tree copy, removal, xattrs."""
