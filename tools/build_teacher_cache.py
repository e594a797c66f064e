"""Precompute the teacher's top-k log-probabilities over a tokenized dataset into a sharded cache.

The command is ``rgkd_megatron.cli.build_teacher_cache``; ``python tools/build_teacher_cache.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.build_teacher_cache import main

if __name__ == "__main__":
    sys.exit(main())
