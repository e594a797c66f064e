"""Thin command-line entry points (rgkd-train, ...)."""
