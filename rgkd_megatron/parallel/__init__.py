"""Launch detection, process groups per role, and the CPU compatibility module."""
