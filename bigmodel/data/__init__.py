"""Reading shards into batches for every task (see sharding/format.py for the format)."""
