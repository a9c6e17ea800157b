"""bigmodel: distributed training of large medical-imaging models.

Subpackages: ``config`` (the schema), ``data`` (shards to batches), ``models`` (backbone + heads),
``losses``, ``metrics``, ``engine`` (training loop and distributed strategies), ``registry`` and
``inference``. See DESIGN.md for the map.
"""

__version__ = "0.1.0"
