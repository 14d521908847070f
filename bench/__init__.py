"""`make bench`: the end-to-end benchmark of a local node (not shipped)."""
