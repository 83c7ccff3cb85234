"""The shipped remote-code files, and writing them into an exported folder (`auto_map`)."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from ..utils.atomic import atomic_write_text

REMOTE_CODE_FILES = ("configuration_qwen2_5_vl_merge.py", "modeling_qwen2_5_vl_merge.py",
                     "processing_qwen2_5_vl_merge.py")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_5_vl_merge.Qwen2_5_VL_MergeConfig",
    "AutoModel": "modeling_qwen2_5_vl_merge.Qwen2_5_VL_MergeForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_qwen2_5_vl_merge.Qwen2_5_VL_MergeForConditionalGeneration",
}
PROCESSOR_CLASS = "Qwen2_5_VL_MergeProcessor"
PROCESSOR_AUTO_MAP = {"AutoProcessor": f"processing_qwen2_5_vl_merge.{PROCESSOR_CLASS}"}


def write_remote_code(folder: str | Path) -> None:
    """Copy the self-contained config/model/processor files into `folder` and set `auto_map` in
    its config.json and processor_config.json, so `AutoModelForImageTextToText` and
    `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` work where qwen_merge_mcore
    is not installed."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: save the model before writing its remote code")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "qwen2_5_vl_merge":
        raise ValueError(f"{config_path} has model_type {config.get('model_type')!r}, not 'qwen2_5_vl_merge'")
    source = resources.files(__package__).joinpath("remote_code")
    for name in REMOTE_CODE_FILES:
        with resources.as_file(source.joinpath(name)) as src:
            shutil.copyfile(src, folder / name)
    config["auto_map"] = dict(AUTO_MAP)
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor_path = folder / "processor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.exists() else {}
    processor.update(processor_class=PROCESSOR_CLASS, auto_map=dict(PROCESSOR_AUTO_MAP))
    atomic_write_text(processor_path, json.dumps(processor, indent=2, sort_keys=True) + "\n")
