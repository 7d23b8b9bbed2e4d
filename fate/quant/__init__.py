"""Expert weights: the HQQ blob layout and dequantization (:mod:`.layout`), quantizing with hqq
(:mod:`.hqq`, converter only), the native CPU kernels (:mod:`.kernels`) and one view of an expert blob
that computes with it (:mod:`.expert`).

``from fate import quant as Q`` gives the layout API and the hqq functions under one name.
"""

from fate.quant.hqq import hqq_reference_dequant, pack_expert, quantize_weight  # noqa: F401
from fate.quant.layout import *  # noqa: F401,F403
from fate.quant.layout import __all__ as _layout_all

__all__ = list(_layout_all) + ["quantize_weight", "pack_expert", "hqq_reference_dequant"]
