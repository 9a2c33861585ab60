"""The GIL: is this a free-threaded build, is the GIL on now, and who turned it back on."""

from __future__ import annotations

import sys
import sysconfig

FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def enabled() -> bool:
    """True when the GIL is on (always, on a GIL build)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def state() -> str:
    """'disabled', 'enabled', or 'enabled (free-threaded build, GIL re-enabled)'."""
    if not enabled():
        return "disabled"
    if FREE_THREADED_BUILD:
        return "enabled (free-threaded build, GIL re-enabled)"
    return "enabled"
