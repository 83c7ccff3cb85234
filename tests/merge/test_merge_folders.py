"""End-to-end merges of tiny Hugging Face folders: what is merged, what is copied, what is refused."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder, ShardedSafetensorsWriter
from qwen_merge_mcore.merging import MergeSpec, MergeValidationError, merge_folders
from qwen_merge_mcore.merging.names import classify
from qwen_merge_mcore.merging.stream import merge_tensor

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")


def load_folder(folder):
    r = SafetensorsFolder(folder)
    return {n: r.get(n) for n in r.names()}


def is_merged(name, include_embeddings=False):
    info = classify(name)
    return info is not None and (info.role in ("layer", "final_norm") or include_embeddings)


def check_merge(spec, out, include_embeddings=False):
    """Every merged tensor equals merge_tensor on the inputs; every other tensor is models[0]'s, bit for bit."""
    result = load_folder(out)
    inputs = [load_folder(m) for m in spec.models]
    base = load_folder(spec.base) if spec.base else None
    assert result.keys() == inputs[0].keys()
    merged = 0
    for name, tensor in result.items():
        assert tensor.dtype == inputs[0][name].dtype  # dtype preserved (bf16 fixtures)
        if is_merged(name, include_embeddings):
            expected = merge_tensor(spec, name, classify(name).layer, [x[name] for x in inputs],
                                    base[name] if base else None).to(tensor.dtype)
            assert torch.equal(tensor, expected), name
            merged += 1
        else:
            assert torch.equal(tensor, inputs[0][name]), name
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (spec.models[0] / f).read_bytes()
    return merged


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_task_vector_merge_of_two_qwen3(tiny, tiny_pair, tmp_path, method):
    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    spec = MergeSpec(method, (a, b), base=tiny["qwen3"], weights=(0.6, 0.4), density=0.3, seed=5)
    out = merge_folders(spec, tmp_path / "out", progress=False)
    assert check_merge(spec, out) == 4 * 11 + 1  # 4 layers x 11 tensors + final norm
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == method and info["weights"] == [0.6, 0.4] and info["merged_tensors"] == 45
    # embeddings and lm_head were not merged: a and b differ there, the output has a's.
    assert not torch.equal(load_folder(a)["lm_head.weight"], load_folder(b)["lm_head.weight"])


@pytest.mark.parametrize("method", ["ties", "linear", "layerswap"])
def test_sliced_merge_equals_the_whole_tensor_merge(tiny, tiny_pair, tmp_path, method):
    # 300-element slices cut every matrix into many row ranges (and a 256-row matrix into 2-row pieces):
    # the TIES cut is still taken over the whole tensor, so the result is exactly the one-piece merge.
    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    kwargs = dict(base=tiny["qwen3"], density=0.3) if method == "ties" else dict(weights=(0.3, 0.7))
    if method == "layerswap":
        kwargs["layers"] = frozenset({1})
    spec = MergeSpec(method, (a, b), **kwargs)
    assert check_merge(spec, merge_folders(spec, tmp_path / "out", progress=False, chunk_elements=300)) == 45


def test_merged_qwen3_loads_and_runs_in_transformers(tiny, tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    out = merge_folders(MergeSpec("ties", (a, b), base=tiny["qwen3"]), tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = AutoTokenizer.from_pretrained(out)("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 1000 and torch.isfinite(logits).all()
    # The loaded weights are the merged file's (nothing re-initialised because of a missing key).
    merged = load_folder(out)["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, merged)


def test_linear_merge_of_two_qwen2_5_vl_keeps_the_vision_tower(tiny_pair, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    a, b = tiny_pair[0]["qwen2_5_vl"], tiny_pair[1]["qwen2_5_vl"]
    spec = MergeSpec("linear", (a, b), weights=(0.9, 0.1))
    out = merge_folders(spec, tmp_path / "out", max_shard_bytes=200_000, progress=False)
    assert check_merge(spec, out) == 2 * 12 + 1
    visual = [n for n in load_folder(out) if n.startswith("visual.")]
    assert visual and "visual.merger.mlp.0.weight" in visual  # copied unchanged, checked in check_merge
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(load_folder(a))
    assert (out / "preprocessor_config.json").read_bytes() == (a / "preprocessor_config.json").read_bytes()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.model.visual.blocks[0].attn.qkv.weight, load_folder(a)["visual.blocks.0.attn.qkv.weight"])
    # (AutoProcessor would also build the video processor, which needs torchvision; not installed here.)
    assert AutoImageProcessor.from_pretrained(out).size.longest_edge == 262144
    assert AutoTokenizer.from_pretrained(out).chat_template == (a / "chat_template.jinja").read_text()


def _llm_only(vlm, dst):
    """A text-only checkpoint with the same language model as a tiny Qwen2.5-VL (the VLM + LLM case)."""
    dst.mkdir()
    weights = {n: t for n, t in load_folder(vlm).items() if not n.startswith("visual.")}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((vlm / "config.json").read_text())["text_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(vlm / "tokenizer.json", dst / "tokenizer.json")
    return dst


def test_vlm_merged_with_a_text_only_llm(tiny, tiny_pair, tmp_path):
    a = tiny_pair[0]["qwen2_5_vl"]
    b = _llm_only(tiny_pair[1]["qwen2_5_vl"], tmp_path / "llm")
    base = _llm_only(tiny["qwen2_5_vl"], tmp_path / "base")
    spec = MergeSpec("dare_ties", (a, b), base=base, density=0.5, seed=1)
    assert check_merge(spec, merge_folders(spec, tmp_path / "out", progress=False)) == 25


def test_layerswap_and_embeddings_flag(tiny_pair, tmp_path):
    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    spec = MergeSpec("layerswap", (a, b), layers=frozenset({0, 1}), include_embeddings=True)
    out = merge_folders(spec, tmp_path / "out", progress=False)
    check_merge(spec, out, include_embeddings=True)
    result, wa, wb = load_folder(out), load_folder(a), load_folder(b)
    assert torch.equal(result["model.layers.1.self_attn.q_proj.weight"], wa["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(result["model.layers.2.self_attn.q_proj.weight"], wb["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(result["lm_head.weight"], wb["lm_head.weight"])  # merged too, with --include-embeddings
    with pytest.raises(ValueError, match=r"layers \[7\] but the models have layers 0-3"):
        merge_folders(MergeSpec("layerswap", (a, b), layers=frozenset({7})), tmp_path / "bad", progress=False)


def test_tied_models_merge(tiny, tiny_pair, tmp_path):
    a, b = tiny_pair[0]["qwen3-tied"], tiny_pair[1]["qwen3-tied"]
    spec = MergeSpec("ties", (a, b), base=tiny["qwen3-tied"], include_embeddings=True)
    out = merge_folders(spec, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in load_folder(out)
    assert check_merge(spec, out, include_embeddings=True) == 45 + 1  # + embed_tokens


def test_same_seed_same_bytes(tiny, tiny_pair, tmp_path):
    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    run = lambda seed, name: (merge_folders(MergeSpec("dare_ties", (a, b), base=tiny["qwen3"], seed=seed),
                                            tmp_path / name, progress=False) / "model.safetensors").read_bytes()
    first = run(3, "one")
    assert run(3, "two") == first
    assert run(4, "three") != first


def test_mismatched_architectures_are_listed(tiny, tiny_pair, tmp_path):
    spec = MergeSpec("linear", (tiny_pair[0]["qwen3"], tiny_pair[1]["qwen2_5_vl"]))
    with pytest.raises(MergeValidationError) as err:
        merge_folders(spec, tmp_path / "out", progress=False)
    text = str(err.value)
    assert "hidden_size: 128 vs 192" in text and "num_hidden_layers: 4 vs 2" in text
    # 26 = the q/k norms of layers 0-1 + all of layers 2-3
    assert "lacks 26 language-model tensors" in text and "layers.2.input_layernorm.weight" in text
    assert "has 6 language-model tensors" in text and "layers.0.self_attn.k_proj.bias" in text
    assert "tensor shapes differ" in text and "embed_tokens.weight (1000, 128) vs (1000, 192)" in text
    assert not (tmp_path / "out").exists()


def test_mismatched_vocabularies_are_refused(tiny, tiny_pair, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_pair[1]["qwen3"], b)
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[20:22]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped
    (b / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeValidationError, match=r"tokenizer vocabulary differs .* in 2 tokens"):
        merge_folders(MergeSpec("linear", (tiny_pair[0]["qwen3"], b)), tmp_path / "out", progress=False)

    c = tmp_path / "c"  # a checkpoint with a smaller vocabulary (rows cut from embeddings and lm_head)
    shutil.copytree(tiny_pair[1]["qwen3"], c)
    weights = load_file(c / "model.safetensors")
    weights = {n: (t[:900] if n in ("model.embed_tokens.weight", "lm_head.weight") else t) for n, t in weights.items()}
    save_file(weights, c / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "vocab_size": 900}))
    with pytest.raises(MergeValidationError) as err:
        merge_folders(MergeSpec("ties", (tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]), base=c),
                      tmp_path / "out", progress=False)
    assert "vocab_size: 1000 vs 900" in str(err.value)
    assert "embed_tokens.weight (1000, 128) vs (900, 128)" in str(err.value)


def test_cli_merges_and_reports_errors(tiny_pair, tmp_path, capsys):
    from qwen_merge_mcore.cli import main

    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    args = ["merge", "--method", "linear", "--model", str(a), "--model", str(b), "--weights", "0.9,0.1",
            "--out", str(tmp_path / "out"), "--no-progress"]
    ok = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", *args], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert check_merge(MergeSpec("linear", (a, b), weights=(0.9, 0.1)), tmp_path / "out") == 45
    assert main(args) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert main(args[:2] + ["ties"] + args[3:] + ["--overwrite"]) == 1
    assert "needs --base" in capsys.readouterr().err
    assert main(args[:-1] + ["--weights", "0.9;0.1", "--overwrite"]) == 1
    assert "--weights '0.9;0.1'" in capsys.readouterr().err


@pytest.mark.parametrize("method,weights", [("linear", "0,0"), ("linear", "0.9,0.9"), ("layerswap", "0.5,0.6")])
def test_weights_that_do_not_sum_to_one_are_refused_unless_asked_for(tiny_pair, tmp_path, capsys, method, weights):
    from qwen_merge_mcore.cli import main

    a, b = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3"]
    args = ["merge", "--method", method, "--model", str(a), "--model", str(b), "--weights", weights,
            "--out", str(tmp_path / "out"), "--no-progress"] + (["--layers", "0"] if method == "layerswap" else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    total = sum(float(w) for w in weights.split(","))
    assert f"sum to {total:g}, not 1" in err and "--any-weight-sum" in err and not (tmp_path / "out").exists()
    # On purpose: the merged tensors are the weighted sums, scale included.
    assert main(args + ["--any-weight-sum"]) == 0
    w = tuple(float(x) for x in weights.split(","))
    layers = frozenset({0}) if method == "layerswap" else frozenset()
    assert check_merge(MergeSpec(method, (a, b), weights=w, layers=layers, any_weight_sum=True), tmp_path / "out")
    # Task-vector methods weight deltas, which need not sum to 1.
    MergeSpec("ties", (a, b), base=a, weights=(1.0, 1.0))


def test_tied_with_untied_follows_one_rule_in_both_orders(tiny_pair, tmp_path):
    untied, tied = tiny_pair[0]["qwen3"], tiny_pair[1]["qwen3-tied"]
    for i, models in enumerate([(untied, tied), (tied, untied)]):
        with pytest.raises(MergeValidationError) as err:
            merge_folders(MergeSpec("linear", models, include_embeddings=True), tmp_path / f"refused{i}",
                          progress=False)
        assert f"{tied} tie lm_head to embed_tokens and {untied} do not" in str(err.value)
        assert "lacks" not in str(err.value) and not (tmp_path / f"refused{i}").exists()
        # Without --include-embeddings both orders merge layers and norms; embeddings and lm_head
        # (or their absence) are the first model's.
        spec = MergeSpec("linear", models)
        out = merge_folders(spec, tmp_path / f"merged{i}", progress=False)
        assert check_merge(spec, out) == 45
        assert ("lm_head.weight" in load_folder(out)) == (models[0] == untied)
