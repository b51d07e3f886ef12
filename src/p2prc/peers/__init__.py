"""Peers: signed records, the membership table, SWIM gossip and its persistence."""
