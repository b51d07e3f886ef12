"""Containers on this node for its peers, and the runtime seam under them."""
