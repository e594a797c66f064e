"""Import a GGUF file (Llama architecture, any ggml quantization) into a Hugging Face checkpoint.

The command is ``rgkd_megatron.cli.import_gguf``; ``python tools/import_gguf.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.import_gguf import main

if __name__ == "__main__":
    sys.exit(main())
