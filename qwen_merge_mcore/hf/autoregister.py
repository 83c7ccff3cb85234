"""Register Qwen-Merge with transformers' Auto classes without importing transformers early.

`import qwen_merge_mcore` must stay cheap (the CLI imports it), while transformers' auto modules
cost seconds. So the registration runs right after transformers itself imports the auto module
concerned: AutoConfig after `configuration_auto`, the model classes after `modeling_auto`,
AutoProcessor after `processing_auto`; modules already imported are handled at once. An import
hook (a meta path finder wrapping the loaders of transformers' modules) notices those imports.
Standard library only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

_AUTO = "transformers.models.auto."


def _register_config() -> None:
    from transformers import AutoConfig

    from .remote_code.configuration_qwen2_5_vl_merge import MODEL_TYPE, Qwen2_5_VL_MergeConfig

    AutoConfig.register(MODEL_TYPE, Qwen2_5_VL_MergeConfig, exist_ok=True)


def _register_models() -> None:
    from transformers import AutoModel, AutoModelForImageTextToText

    from .remote_code.configuration_qwen2_5_vl_merge import Qwen2_5_VL_MergeConfig
    from .remote_code.modeling_qwen2_5_vl_merge import Qwen2_5_VL_MergeForConditionalGeneration

    for auto in (AutoModel, AutoModelForImageTextToText):
        auto.register(Qwen2_5_VL_MergeConfig, Qwen2_5_VL_MergeForConditionalGeneration, exist_ok=True)


def _register_processor() -> None:
    from transformers import AutoProcessor

    from .remote_code.configuration_qwen2_5_vl_merge import Qwen2_5_VL_MergeConfig
    from .remote_code.processing_qwen2_5_vl_merge import Qwen2_5_VL_MergeProcessor

    AutoProcessor.register(Qwen2_5_VL_MergeConfig, Qwen2_5_VL_MergeProcessor, exist_ok=True)


# A step runs once its auto module is loaded and no module of transformers (or of our remote
# code) is half-initialised: transformers imports its auto modules from inside other modules, and
# our classes import transformers'. Every such module that finishes loading retries the steps, so
# the outermost one of an import chain runs them.
_STEPS = [
    (_AUTO + "configuration_auto", _register_config),
    (_AUTO + "modeling_auto", _register_models),
    (_AUTO + "processing_auto", _register_processor),
]
_WATCHED_PREFIXES = ("transformers.", "qwen_merge_mcore.hf.remote_code.")
_done: set = set()
_busy: list = []


def _watched(name: str) -> bool:
    return name == "transformers" or name.startswith(_WATCHED_PREFIXES)


def _initializing(module) -> bool:
    return getattr(getattr(module, "__spec__", None), "_initializing", False)


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not _initializing(module)


def _quiet() -> bool:
    return not any(_watched(name) and _initializing(module) for name, module in list(sys.modules.items()))


def _run_ready() -> None:
    # Not re-entered: a step's own imports finish watched modules, which calls back here; the
    # loop below picks up what became ready meanwhile.
    if _busy:
        return
    _busy.append(True)
    try:
        progress = True
        while progress:
            progress = False
            for trigger, step in _STEPS:
                if step in _done or not _loaded(trigger) or not _quiet():
                    continue
                _done.add(step)
                progress = True
                try:
                    step()
                except Exception as exc:  # a transformers without these names must still import
                    warnings.warn(f"qwen_merge_mcore could not register Qwen-Merge with transformers "
                                  f"({step.__name__}): {exc!r}", stacklevel=2)
    finally:
        _busy.clear()
    if len(_done) == len(_STEPS):  # nothing left to watch for; rebinding is safe mid-import
        sys.meta_path = [f for f in sys.meta_path if not isinstance(f, _Finder)]


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader, self._name = loader, name

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__spec__._initializing = False  # set back by importlib right after; _run_ready checks it
        _run_ready()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def install() -> None:
    """Register now for the auto modules already imported, later for the others (idempotent)."""
    if len(_done) < len(_STEPS) and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    _run_ready()
