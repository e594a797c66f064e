"""The method registry (docs/adding_a_method.md): one ``MethodSpec`` per ``pbkd.method``.

- ``spec``: ``MethodSpec`` (roles, teacher needs, plan flags, heads, trainer), ``TeacherNeed``, the
  role names.
- ``registry``: ``register_method``, ``get_method``, ``method_names``.
- one module per family registering its specs, imported here in the order of the config choices:
  ``adversarial`` (pbkd, mm_pbkd), ``seqkd``, ``kd`` (one method per registered KD divergence).

Importing this package imports no torch: trainers are named by strings and imported on use.
"""

import importlib

from rgkd_megatron.methods.registry import get_method, method_names, register_method, registered_methods
from rgkd_megatron.methods.spec import POLICY, REWARD, ROLES, TEACHER, MethodSpec, TeacherNeed

BUILTIN_FAMILIES = ("adversarial", "seqkd", "kd")
"""The modules registering the built-in methods, imported in this order (the order of the
``pbkd.method`` choices). A new family module is added here."""
for _family in BUILTIN_FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

__all__ = [
    "BUILTIN_FAMILIES",
    "POLICY",
    "REWARD",
    "ROLES",
    "TEACHER",
    "MethodSpec",
    "TeacherNeed",
    "get_method",
    "method_names",
    "register_method",
    "registered_methods",
]
