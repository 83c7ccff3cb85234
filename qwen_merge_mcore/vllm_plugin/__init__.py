"""vLLM out-of-tree model for exported Qwen-Merge checkpoints (`vllm.general_plugins` entry point)."""


def register() -> None:
    """Called by vLLM in each of its processes; must be cheap and idempotent."""
    from vllm import ModelRegistry

    if "Qwen2_5_VL_MergeForConditionalGeneration" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("Qwen2_5_VL_MergeForConditionalGeneration",
                                     "qwen_merge_mcore.vllm_plugin.model:Qwen2_5_VL_MergeForConditionalGeneration")
