"""Inspect a teacher top-k cache: verify its checksums, report its size and how much mass the top-k covers.

The command is ``rgkd_megatron.cli.inspect_cache``; ``python tools/inspect_cache.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.inspect_cache import main

if __name__ == "__main__":
    sys.exit(main())
