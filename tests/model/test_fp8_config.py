"""FP8 plumbing that runs without a GPU: PrecisionConfig -> Megatron fields, and the bf16 fallback."""

import types
import warnings

import pytest

from qwen_merge_mcore.config import PrecisionConfig
from qwen_merge_mcore.models import fp8 as fp8_mod
from qwen_merge_mcore.models.fp8 import fp8_config_kwargs, fp8_fallback

ALIGNED = {"hidden_size": 128, "ffn_hidden_size": 256}


@pytest.fixture(autouse=True)
def fresh_warnings():
    fp8_mod._warned.clear()  # each test sees its own first warning


def test_no_fp8_gives_no_fields():
    assert fp8_config_kwargs(PrecisionConfig(), num_layers=4, pipeline_size=1, widths=ALIGNED) == {}
    assert fp8_config_kwargs(PrecisionConfig(fp8="hybrid"), num_layers=4, pipeline_size=1, widths=ALIGNED,
                             enabled=False) == {}


def test_tensorwise_keeps_first_and_last_layers_bf16():
    kw = fp8_config_kwargs(PrecisionConfig(fp8="hybrid", fp8_recipe="tensorwise"), num_layers=4,
                           pipeline_size=1, widths=ALIGNED)
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == "tensorwise"
    assert kw["first_last_layers_bf16"] and kw["num_layers_at_start_in_bf16"] == 1
    assert kw["num_layers_at_end_in_bf16"] == 1


def test_delayed_cannot_keep_bf16_layers_and_says_so():
    with pytest.warns(RuntimeWarning, match="delayed scaling"):
        kw = fp8_config_kwargs(PrecisionConfig(fp8="e4m3", fp8_recipe="delayed"), num_layers=4, pipeline_size=1,
                               widths=ALIGNED)
    assert kw["fp8_recipe"] == "delayed" and "first_last_layers_bf16" not in kw


def test_unaligned_widths_fall_back_to_bf16_with_one_warning():
    precision = PrecisionConfig(fp8="hybrid", fp8_recipe="tensorwise")
    widths = {"hidden_size": 128, "ffn_hidden_size": 172}  # 172, like the ViT's 3420, is not a multiple of 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fp8_config_kwargs(precision, num_layers=4, pipeline_size=1, widths=widths) == {}
        assert fp8_config_kwargs(precision, num_layers=4, pipeline_size=1, widths=widths) == {}
    assert len([w for w in caught if "ffn_hidden_size" in str(w.message)]) == 1


def test_unaligned_token_count_runs_that_forward_in_bf16():
    config = types.SimpleNamespace(fp8="hybrid")
    with fp8_fallback(config, 64):
        assert config.fp8 == "hybrid"
    with pytest.warns(RuntimeWarning, match="multiple of 16"):
        with fp8_fallback(config, 70):
            assert config.fp8 is None
    assert config.fp8 == "hybrid"  # restored for the next forward


def test_language_config_carries_fp8_and_uneven_pipeline_into_megatron():
    from qwen_merge_mcore.config import ParallelConfig
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config
    from qwen_merge_mcore.models.language_config import language_transformer_config

    config = language_transformer_config(
        tiny_model_config().language, ParallelConfig(pipeline_model_parallel_size=2, first_stage_layers=1),
        PrecisionConfig(fp8="hybrid", fp8_recipe="blockwise"))
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == ("hybrid", "blockwise", True)
    assert config.num_layers_in_first_pipeline_stage == 1 and config.variable_seq_lengths
    assert not config.apply_rope_fusion  # MRoPE angles are per token
