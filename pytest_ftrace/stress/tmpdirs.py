"""Each worker thread's own tmp_path / tmpdir, named by thread and round, made with pytest's
tmp_path_factory (and removed as pytest removes them).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

TMP_NAMES = ("tmp_path", "tmpdir")
_TMP_LOCK = threading.Lock()  # tmp_path_factory is not meant for several threads at once


def builtin_tmp(item: pytest.Item, name: str) -> bool:
    """Whether `name` is pytest's own tmp_path / tmpdir for this test (not a user's override)."""
    if name not in TMP_NAMES:
        return False
    info = getattr(item, "_fixtureinfo", None)
    fixturedefs = info.name2fixturedefs.get(name) if info is not None else None
    if not fixturedefs:
        return False
    module = getattr(fixturedefs[-1].func, "__module__", "") or ""
    return module.startswith("_pytest") and hasattr(item.config, "_tmp_path_factory")


class ThreadTmp:
    """One worker thread's tmp_path / tmpdir."""

    def __init__(self, item: pytest.Item, index: int):
        self._item = item
        self._index = index
        self.names = tuple(name for name in TMP_NAMES if builtin_tmp(item, name))
        self._kept = None  # the thread's directory, once a fixture of it uses one
        self._rounds: dict[int, Any] = {}
        self._made: list[Any] = []

    def _make(self, suffix: str):
        factory = self._item.config._tmp_path_factory
        name = re.sub(r"[\W]", "_", self._item.name)[:30]
        with _TMP_LOCK:
            path = factory.mktemp(f"{name}_t{self._index}{suffix}_", numbered=True)
        self._made.append(path)
        return path

    def value(self, name: str, iteration: int | None):
        """`name`'s value in round `iteration` (None: for a fixture, kept by the thread)."""
        if iteration is None and self._kept is None:
            self._kept = self._make("")
        path = self._kept
        if path is None:
            path = self._rounds.get(iteration)
            if path is None:
                path = self._rounds[iteration] = self._make(f"_r{iteration}")
        if name == "tmpdir":
            from _pytest.compat import legacy_path

            return legacy_path(path)
        return path

    def cleanup(self) -> None:
        """As tmp_path does: with tmp_path_retention_policy 'failed', a passed test's
        directories go."""
        if not self._made:
            return
        from _pytest.tmpdir import tmppath_result_key

        factory = self._item.config._tmp_path_factory
        result = self._item.stash.get(tmppath_result_key, {})
        if getattr(factory, "_retention_policy", "all") == "failed" and result.get("call", True):
            import shutil

            for path in self._made:
                shutil.rmtree(path, ignore_errors=True)
