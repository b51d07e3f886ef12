"""Dask clusters on the pool: the owner node side (CA, SSH hub, service, image)."""
