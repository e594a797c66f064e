"""Generate a teacher's responses for a prompt set: ``{prompt, response, reference, truncated, sample}`` JSONL.

The command is ``rgkd_megatron.cli.generate_responses``; ``python tools/generate_responses.py --help`` lists its flags.
"""

import sys

from rgkd_megatron.cli.generate_responses import main

if __name__ == "__main__":
    sys.exit(main())
