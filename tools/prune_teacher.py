"""Initialise a student from a teacher by depth pruning and optional FFN-width reduction (HF -> HF).

The command is ``rgkd_megatron.cli.prune_teacher``; ``python tools/prune_teacher.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.prune_teacher import main

if __name__ == "__main__":
    sys.exit(main())
