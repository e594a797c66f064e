"""Convert Hugging Face Llama-family checkpoints to megatron-core distributed checkpoints and back.

The command is ``rgkd_megatron.cli.convert_checkpoint``; ``python tools/convert_checkpoint.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
