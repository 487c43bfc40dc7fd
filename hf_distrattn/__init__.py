"""hf-distrattn: DistrAttention and Tree Attention for Hugging Face Transformers.

``import hf_distrattn`` registers ``attn_implementation="distr"`` (and ``"tree"``) with Transformers: at once when
Transformers is already imported, else the moment it is (a post-import hook), so that importing the package, and
the command line's ``--help``, load neither torch nor Transformers. The public names load on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
_EXPORTS = {"DEFAULT_CONFIG": "api", "distr_attention": "api", "Calibration": "calibration",
            "calibrate": "calibration", "DistrConfig": "config", "parse_attn_spec": "config",
            "configure": "integration", "layer_configs": "integration", "tree": None}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_distrattn' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    return module if _EXPORTS[name] is None else getattr(module, name)


def _register() -> None:
    """Import the modules that register ``"distr"`` and ``"tree"`` when they load (one may be loading already,
    when its own ``import transformers`` fired the hook: it registers as it finishes)."""
    importlib.import_module(".integration", __name__)
    importlib.import_module(".tree", __name__)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after the ``transformers`` package has been imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
