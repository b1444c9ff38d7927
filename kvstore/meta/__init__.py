"""The metadata group: the authority on the cluster map (and, as they land, slot moves)."""
