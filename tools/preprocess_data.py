"""Tokenize a prompt/response (or chat) JSONL file into a megatron-core indexed dataset.

The command is ``rgkd_megatron.cli.preprocess_data``; ``python tools/preprocess_data.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
