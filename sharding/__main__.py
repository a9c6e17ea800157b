"""``python -m sharding`` works like ``bigmodel-shard``."""

import sys

from sharding.cli import main

if __name__ == "__main__":
    sys.exit(main())
