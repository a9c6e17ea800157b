"""Everything that knows Ray Train: the bigmodel-train driver, per-worker entry, cluster configs."""
