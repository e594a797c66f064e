"""Command-line entry points: the console scripts (``rgkd-train``, ``rgkd-distill``, ``rgkd-eval``,
``rgkd-plan``) and the tools run as ``python tools/NAME.py`` (``rgkd_megatron.cli.NAME``). The flag
names are one vocabulary (docs/cli.md); ``teacher_launch`` and ``recipe`` hold what commands share."""
