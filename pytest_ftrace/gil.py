"""The GIL: is this a free-threaded build, is the GIL on now, and who turned it back on.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import sys


def _free_threaded_build() -> bool:
    abiflags = getattr(sys, "abiflags", None)  # "t" marks a free-threaded build (POSIX)
    if abiflags is not None:
        return "t" in abiflags
    import sysconfig

    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


FREE_THREADED_BUILD = _free_threaded_build()


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


class Watch:
    """Notices the GIL coming back on during the session, and names the modules imported then.

    On a free-threaded build, importing an extension that does not declare free-threading
    support turns the GIL on for the rest of the process.
    """

    def __init__(self) -> None:
        self.active = FREE_THREADED_BUILD
        self.events: list[tuple[str, str]] = []
        self._was_enabled = enabled()
        self._modules: set[str] = set()

    def before(self) -> None:
        if self.active and not self._was_enabled:
            self._modules = set(sys.modules)

    def after(self, where: str) -> str | None:
        """A message if the GIL went on since before(); None otherwise."""
        if not self.active or self._was_enabled or not enabled():
            return None
        self._was_enabled = True
        new = sorted(set(sys.modules) - self._modules)
        extensions = [name for name in new if _is_extension(sys.modules.get(name))]
        culprits = extensions or new
        named = ", ".join(repr(name) for name in culprits[:10]) or "(no new module)"
        message = (
            f"the GIL was re-enabled during {where}; modules imported then: {named}. "
            "An extension module that does not declare free-threading support turns the GIL "
            "on for the rest of the process."
        )
        self.events.append((where, message))
        return message


def _is_extension(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return path.endswith((".so", ".pyd"))
