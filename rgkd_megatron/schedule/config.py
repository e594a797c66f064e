"""The ``placement`` and ``schedule`` config sections, re-exported: they live in
``config/placement.py`` (the config package never imports the scheduler)."""

from rgkd_megatron.config.placement import PlacementConfig, RoleWindowConfig, ScheduleConfig

__all__ = ["PlacementConfig", "RoleWindowConfig", "ScheduleConfig"]
