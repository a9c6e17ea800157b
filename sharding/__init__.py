"""Turning medical datasets into WebDataset shards plus a manifest (`bigmodel-shard`).

Never imports torch or bigmodel: shard building must run on a plain CPU box.
"""

__version__ = "0.1.0"
