"""Train a small byte-level BPE tokenizer with Hugging Face ``tokenizers``.

The command is ``rgkd_megatron.cli.train_tokenizer``; ``python tools/train_tokenizer.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
