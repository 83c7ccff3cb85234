"""Config loading: presets, overrides, and errors that name the key before anything is built."""

import textwrap

import pytest

from qwen_merge_mcore.config import ConfigError, PRESETS, config_from_dict, load_config
from qwen_merge_mcore.config.presets import QWEN3_SHAPES


def _cfg(**sections):
    raw = {"model": {"preset": "tiny"}, "train": {"train_iters": 1}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


def _error(**sections) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _cfg(**sections)
    return info.value


@pytest.mark.parametrize("size", sorted(QWEN3_SHAPES))
def test_72bvit_presets_have_published_shapes(size):
    cfg = config_from_dict({"model": {"preset": f"qwen-merge-72bvit-{size}"}, "train": {"train_iters": 1}})
    vit = cfg.model.vision
    assert (vit.depth, vit.hidden_size, vit.num_heads, vit.intermediate_size) == (32, 1280, 16, 3420)
    assert vit.fullatt_block_indexes == [7, 15, 23, 31] and vit.window_size == 112
    assert cfg.model.projector.merger_out_size == 8192
    lang = cfg.model.language
    layers, hidden, heads, groups, ffn, tied = QWEN3_SHAPES[size]
    assert (lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups) == (
        layers, hidden, heads, groups)
    assert (lang.ffn_hidden_size, lang.tie_word_embeddings, lang.vocab_size) == (ffn, tied, 151936)
    assert cfg.model.image_token_id == 151655


def test_known_published_sizes():
    assert QWEN3_SHAPES["32b"] == (64, 5120, 64, 8, 25600, False)
    assert QWEN3_SHAPES["0.6b"] == (28, 1024, 16, 8, 3072, True)
    assert {"tiny", "qwen-merge-72bvit-4b", "qwen-merge-72bvit-32b"} <= set(PRESETS)


def test_unknown_key_is_named_with_suggestion():
    err = _error(train={"lrr": 1e-4})
    assert err.key == "train.lrr" and "did you mean 'lr'" in str(err)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="'trian'"):
        config_from_dict({"trian": {}, "train": {"train_iters": 1}})


def test_tp_must_divide_heads():
    err = _error(parallel={"tensor_model_parallel_size": 3})
    assert err.key == "parallel.tensor_model_parallel_size"
    assert "num_attention_heads" in str(err)


def test_tp_must_divide_kv_heads():
    # tiny: 4 heads, 2 KV groups: TP=4 divides the heads but not the KV groups
    err = _error(parallel={"tensor_model_parallel_size": 4})
    assert "num_query_groups" in str(err)


def test_layers_must_divide_across_pipeline_stages():
    err = _error(parallel={"pipeline_model_parallel_size": 3})
    assert err.key == "parallel.pipeline_model_parallel_size" and "num_layers=4" in str(err)
    err = _error(parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4})
    assert "4 virtual chunks" in str(err)


def test_uneven_first_stage():
    cfg = _cfg(parallel={"pipeline_model_parallel_size": 2, "first_stage_layers": 1})
    assert cfg.parallel.stage_layer_counts(4) == [1, 3]
    err = _error(parallel={"pipeline_model_parallel_size": 3, "first_stage_layers": 1})
    assert err.key == "parallel.first_stage_layers" and "3 decoder layers" in str(err)


def test_wrong_types_are_named():
    assert _error(train={"train_iters": "ten"}).key == "train.train_iters"
    assert _error(parallel={"sequence_parallel": "yes"}).key == "parallel.sequence_parallel"
    assert _error(train={"freeze": ["vision", "ears"]}).key == "train.freeze[1]"
    assert _error(model={"backend": "cuda"}).key == "model.backend"


def test_fp8_needs_transformer_engine_here():
    from qwen_merge_mcore.utils.runtime import te_available

    if te_available():
        pytest.skip("Transformer Engine is available on this machine")
    err = _error(precision={"fp8": "hybrid"})
    assert err.key == "precision.fp8" and "Transformer Engine" in str(err)
    # A config for another machine can still be inspected.
    raw = {"model": {"preset": "tiny"}, "train": {"train_iters": 1}, "precision": {"fp8": "hybrid"}}
    assert config_from_dict(raw, check_runtime=False).precision.fp8 == "hybrid"


def test_fp8_with_local_backend_is_refused():
    raw = {"model": {"preset": "tiny", "backend": "local"}, "train": {"train_iters": 1},
           "precision": {"fp8": "hybrid"}}
    with pytest.raises(ConfigError, match="precision.fp8"):
        config_from_dict(raw, check_runtime=False)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent("""
        model:
          preset: tiny
          language:
            tie_word_embeddings: true
        train:
          train_iters: 5
          lr: 1e-3
        data:
          datasets:
            - {path: a.jsonl, weight: 2}
    """))
    cfg = load_config(path, ["train.lr=1e-4", "parallel.tensor_model_parallel_size=2",
                             "train.freeze=[vision,language]", "data.datasets=[{path: b.parquet}]"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.train.freeze == ["vision", "language"]
    assert cfg.model.language.tie_word_embeddings is True and cfg.model.language.hidden_size == 128
    assert [d.path for d in cfg.data.datasets] == ["b.parquet"]


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        config_from_dict({"model": {"preset": "qwen-merge-72bvit-7b"}, "train": {"train_iters": 1}})


def test_vocab_padding():
    lang = _cfg().model.language
    assert lang.vocab_size % lang.make_vocab_size_divisible_by != 0  # the fixture keeps this feature
    assert lang.padded_vocab_size(1) == 1024 and lang.padded_vocab_size(2) == 1024
    assert lang.padded_vocab_size(4) == 1024 and lang.padded_vocab_size(16) == 2048


@pytest.mark.parametrize("override, reason", [
    ("train.lr=inf", "must be a finite number"), ("train.lr=.inf", "must be a finite number"),
    ("train.lr=nan", "must be a finite number"), ("train.min_lr=-inf", "must be a finite number"),
    ("train.adam_eps=0", "must be > 0"), ("train.weight_decay=-0.1", "must be >= 0"),
    ("train.adam_beta2=1.0", "must lie in [0, 1)"), ("train.lr=-1e-4", "must be > 0")])
def test_non_finite_or_invalid_hyper_parameters_are_refused(override, reason):
    """lr=inf once trained NaN weights, which the run saved as its latest checkpoint."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.preset=tiny", "train.train_iters=1", override])
    assert info.value.key == override.split("=")[0] and reason in str(info.value), info.value
