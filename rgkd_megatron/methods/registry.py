"""The method registry: ``pbkd.method`` name -> ``MethodSpec`` (docs/adding_a_method.md).

``register_method`` adds a spec (a name registered twice is an error, so two modules cannot silently
fight over one name); ``get_method`` looks one up, raising a ValueError that names ``pbkd.method``
and lists the registered names; ``method_names`` lists them in registration order (the order of
the ``pbkd.method`` choices in the config reference). The built-in methods register when
``rgkd_megatron.methods`` is imported (its ``__init__`` imports one module per family).
"""

from __future__ import annotations

from rgkd_megatron.methods.spec import MethodSpec

_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` under ``spec.name``; returns it. Raises ValueError for a name already taken."""
    if not spec.name.isidentifier():
        raise ValueError(f"method name {spec.name!r}: expected an identifier (it is a config value)")
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered ({_METHODS[spec.name].trainer})")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name`` (raises ValueError naming ``pbkd.method``)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"pbkd.method: expected one of {method_names()}, got {name!r}") from None


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def registered_methods() -> tuple[MethodSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_METHODS.values())
