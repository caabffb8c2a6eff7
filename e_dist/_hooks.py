"""Install the DeepSpeed hooks when DeepSpeed is (or gets) imported.

``import e_dist`` must make ``"optimizer": {"type": "ALTO"}`` work in a
DeepSpeed config without importing DeepSpeed for users who never use it: if
DeepSpeed is already imported the hooks go in at once, otherwise right after
its import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after module ``name`` finishes loading."""

    def __init__(self, name: str, callback: Callable[[], object]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        exec_module = loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            callback()

        loader.exec_module = exec_then_callback
        return spec


def install_deepspeed_hooks() -> None:
    from e_dist import deepspeed as ds_hooks

    if "deepspeed" in sys.modules:
        ds_hooks.install()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("deepspeed", ds_hooks.install))
