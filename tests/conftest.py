import sys
import sysconfig

import pytest

FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

only_free_threaded = pytest.mark.skipif(
    not FREE_THREADED_BUILD, reason="needs a free-threaded (3.13t) build"
)
only_gil_build = pytest.mark.skipif(FREE_THREADED_BUILD, reason="needs a GIL-enabled build")


def gil_enabled() -> bool:
    return getattr(sys, "_is_gil_enabled", lambda: True)()
