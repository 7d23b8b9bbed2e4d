"""fate-convert: Hugging Face MoE checkpoint → one fate bundle.

``fate.convert`` is both this sub-package and the Python API ``fate.convert(model_dir, out, **options)``:
once a sub-module is imported, Python binds the package over any function of the same name in
``fate``, so the package itself is made callable instead.
"""

import sys
import types

from fate.convert.pipeline import ConvertResult, convert as _convert

__all__ = ["ConvertResult"]


class _CallableModule(types.ModuleType):
    def __call__(self, model_dir, out, **options) -> ConvertResult:
        """Convert a Hugging Face MoE checkpoint into a fate bundle; see ``fate-convert --help``."""
        return _convert(model_dir, out, **options)


sys.modules[__name__].__class__ = _CallableModule
