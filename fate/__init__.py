"""fate: run Mixture-of-Experts language models on machines too small to hold them.

``fate.convert(model_dir, out)`` turns a Hugging Face MoE checkpoint into one bundle;
``fate.load(bundle)`` opens a bundle for generation.
"""

__version__ = "0.1.0"

from fate import convert  # noqa: E402,F401  (a callable package: fate.convert(model_dir, out, **options))
from fate.runtime.engine import EngineOptions, FateModel, load  # noqa: E402,F401
