"""Role scheduling (docs/design.md, roles and the scheduler): placement, the plan, and the cost model.

- ``config``: the ``placement`` and ``schedule`` config sections, re-exported from ``config/placement.py``.
- ``placement``: map a placement (validated by ``config/roles.py``) to one ``RoleLayout`` per role.
- ``plan``: the plan as pure data (events with inputs, outputs and dependencies), its invariant
  checker and JSON serialisation; ``simulate``: per-role busy/idle and iteration time of a plan.
- ``cost_model``: phase times from FLOP/bandwidth estimates for H100/H200 clusters, presets.

What a method does (its roles, its plan flags) is read from its ``MethodSpec`` (``rgkd_megatron.methods``);
this package imports ``config`` and ``methods``, neither imports it. Nothing here creates a process
group; the modules import no torch (``placement.role_layouts`` imports ``parallel.groups`` lazily),
so the ``rgkd-plan`` planner starts in well under a second.
"""
