"""FP8 plumbing that runs without a GPU: PrecisionConfig -> Megatron fields, and the bf16 fallback."""

import types
import warnings

import pytest
import torch

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


class _FakeTELinear(torch.nn.Module):
    """The `is_first_microbatch` protocol of Megatron's TE wrappers: the flag this forward saw,
    cleared after it."""

    def __init__(self):
        super().__init__()
        self.is_first_microbatch, self.seen = True, []

    def forward(self):
        self.seen.append(self.is_first_microbatch)
        self.is_first_microbatch = False


def _block(recipe="tensorwise", sequence_parallel=False):
    block = torch.nn.Module()
    block.config = types.SimpleNamespace(fp8="hybrid", fp8_recipe=recipe, sequence_parallel=sequence_parallel)
    block.layers = torch.nn.ModuleList([_FakeTELinear(), _FakeTELinear()])
    return block


def _forward(block, tokens):
    with fp8_fallback(block, tokens):
        fp8 = block.config.fp8
        for layer in block.layers:
            layer()
    return fp8


def test_unaligned_token_count_runs_that_forward_in_bf16():
    block = _block()
    assert _forward(block, 64) == "hybrid"
    with pytest.warns(RuntimeWarning, match="not a multiple of 8"):
        assert _forward(block, 70) is None
    assert block.config.fp8 == "hybrid"  # restored for the next forward
    assert _forward(_block("mxfp8"), 48) is None  # mxfp8 needs 32 per rank
    assert _forward(_block("blockwise", sequence_parallel=True), 64) is None  # 128 with sequence parallel
    assert _forward(_block("blockwise"), 64) == "hybrid"


def test_fp8_forward_after_a_bf16_first_microbatch_quantises_afresh():
    """TE caches FP8 weights when is_first_microbatch is True and reuses them while it is False;
    a bf16 first micro-batch caches nothing, so the step's FP8 forwards run with the flag at None
    (quantise afresh, cache nothing) until the schedule re-arms it at the next step."""
    block = _block()
    for layer in block.layers:  # the schedule, at the start of a step
        layer.is_first_microbatch = True
    with pytest.warns(RuntimeWarning):
        assert _forward(block, 70) is None
    assert _forward(block, 64) == "hybrid" and _forward(block, 64) == "hybrid"
    for layer in block.layers:  # next step
        layer.is_first_microbatch = True
    _forward(block, 64), _forward(block, 64)
    for layer in block.layers:
        assert layer.seen == [True, None, None, True, False]
    # A later micro-batch in bf16 leaves this step's valid cache in use.
    block = _block()
    for tokens in (64, 70, 64):
        _forward(block, tokens)
    assert block.layers[0].seen == [True, False, False]


@pytest.mark.parametrize("recipe, sequence_parallel, per_rank", [
    ("delayed", False, 8), ("tensorwise", True, 8), ("blockwise", False, 8), ("blockwise", True, 128),
    ("mxfp8", False, 32), ("mxfp8", True, 32)])
def test_token_alignment_per_recipe(recipe, sequence_parallel, per_rank):
    from qwen_merge_mcore.fp8_alignment import fp8_sequence_multiple, fp8_token_alignment

    assert fp8_token_alignment(recipe, sequence_parallel) == per_rank
    # Under sequence parallelism each of the TP ranks holds seq / TP tokens of the sequence.
    assert fp8_sequence_multiple(recipe, 4, sequence_parallel) == per_rank * (4 if sequence_parallel else 1)


def test_width_alignment_per_recipe():
    precision = PrecisionConfig(fp8="hybrid", fp8_recipe="mxfp8")
    with pytest.warns(RuntimeWarning, match="divisible by 32"):
        assert fp8_config_kwargs(precision, num_layers=4, pipeline_size=1, widths={"hidden_size": 48}) == {}
    precision.fp8_recipe = "tensorwise"
    assert fp8_config_kwargs(precision, num_layers=4, pipeline_size=1, widths={"hidden_size": 48})["fp8"]


def test_config_pads_packed_sequences_for_the_recipe():
    from qwen_merge_mcore.config import ConfigError, config_from_dict

    def cfg(recipe, pad, sp=True):
        return config_from_dict({"model": {"preset": "tiny"}, "train": {"train_iters": 1},
                                 "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": sp},
                                 "precision": {"fp8": "hybrid", "fp8_recipe": recipe},
                                 "data": {"pad_to_multiple_of": pad}}, check_runtime=False)

    assert cfg("tensorwise", 16).data.pad_to_multiple_of == 16  # 8 tokens per rank at TP=2
    with pytest.raises(ConfigError, match="set data.pad_to_multiple_of=256") as err:
        cfg("blockwise", 16)  # 128 per rank x TP 2
    assert err.value.key == "data.pad_to_multiple_of" and "128 tokens per rank x TP 2" in str(err.value)
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of=32"):
        cfg("mxfp8", 16, sp=False)
    assert cfg("blockwise", 256).precision.fp8_recipe == "blockwise"


@pytest.mark.parametrize("recipe, capability, cuda, refused", [
    ("mxfp8", (9, 0), "12.9", "Blackwell"), ("mxfp8", (10, 0), "12.9", None), ("mxfp8", (12, 0), "12.9", "10.x"),
    ("blockwise", (9, 0), "12.8", "CUDA 12.9"), ("blockwise", (9, 0), "12.9", None),
    ("tensorwise", (8, 0), "12.4", "8.9"), ("tensorwise", (8, 9), "12.4", None), ("delayed", (9, 0), None, None)])
def test_recipes_need_a_gpu_that_runs_them(recipe, capability, cuda, refused):
    from qwen_merge_mcore.fp8_alignment import fp8_unsupported

    reason = fp8_unsupported(recipe, capability, cuda)
    assert (reason is None) == (refused is None) and (refused is None or refused in reason), reason


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
