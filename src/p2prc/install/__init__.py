"""Set up a p2prc node on a machine given only SSH (``p2prc install-node``)."""
