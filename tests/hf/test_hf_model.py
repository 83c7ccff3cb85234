"""The exported Qwen-Merge model in transformers: Auto classes, remote code, numerical parity with
the parts it is built from (Qwen2.5-VL vision tower, Qwen3 decoder), clear errors for bad folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .helpers import IMAGE_PROMPT, TEXT_PROMPT, hf_greedy, hf_inputs

REPO = Path(__file__).resolve().parents[2]


def test_import_registers_lazily():
    code = ("import sys, qwen_merge_mcore; assert 'transformers' not in sys.modules, 'import pulled in transformers'\n"
            "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING as M\n"
            "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING as P\n"
            "c = CONFIG_MAPPING['qwen2_5_vl_merge']\n"
            "print(c.__module__, M[c].__name__, P[c].__name__)\n")
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The registered classes are the shipped remote-code files themselves, not a second copy.
    assert out.stdout.split() == ["qwen_merge_mcore.hf.remote_code.configuration_qwen2_5_vl_merge",
                                  "Qwen2_5_VL_MergeForConditionalGeneration", "Qwen2_5_VL_MergeProcessor"]


def test_export_layout(merge_dirs):
    from safetensors import safe_open

    folder = merge_dirs["untied"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl_merge"
    assert config["architectures"] == ["Qwen2_5_VL_MergeForConditionalGeneration"]
    assert config["vision_config"]["out_hidden_size2"] == config["text_config"]["hidden_size"] == 128
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [8, 12, 12]
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_qwen2_5_vl_merge.")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        mlp4 = f.get_tensor("visual.merger.mlp.4.weight").float()
        assert f.get_tensor("visual.merger.mlp.4.bias").abs().max() == 0
    assert {k.split(".")[0] for k in keys} == {"visual", "model", "lm_head"}
    assert mlp4.shape == (128, 192) and 0.015 < mlp4.std() < 0.025  # N(0, 0.02) init
    tied = json.loads((merge_dirs["tied"] / "config.json").read_text())
    assert tied["tie_word_embeddings"] is True
    with safe_open(merge_dirs["tied"] / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_text_logits_equal_qwen3(merge_dirs, tiny, variant):
    """Language weights untouched: text-only logits are Qwen3's (MRoPE with t=h=w is 1D RoPE)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(merge_dirs[variant], dtype=torch.float32).eval()
    qwen3 = AutoModelForCausalLM.from_pretrained(tiny["qwen3-tied" if variant == "tied" else "qwen3"],
                                                 dtype=torch.float32).eval()
    ids = torch.randint(10, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in one row
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
        want = qwen3(input_ids=ids, attention_mask=mask).logits
    # fp32, the same layers; only the rotary cos/sin are assembled differently (MRoPE sections
    # of equal ids), which changes nothing bitwise beyond float reassociation: 1e-5 absolute on
    # logits of size ~1.
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-5)


def _mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, section: list[int]):
    """Reference MRoPE, written from the Qwen2.5-VL description: frequency i of the rotary half
    takes its angle from the t, h or w position according to `section`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[..., None] * inv_freq  # [3, L, D/2]
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    picked = angles[axis, :, torch.arange(head_dim // 2)].T  # [L, D/2]
    emb = torch.cat([picked, picked], dim=-1)[None]
    return emb.cos().float(), emb.sin().float()


def test_multimodal_forward_matches_reference(loaded, merge_dirs, tiny, image):
    """A reference assembled from transformers' Qwen2.5-VL vision tower (+ GELU + mlp.4) and the
    original Qwen3 decoder run with independently computed MRoPE."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qwen_merge_mcore.positions import mrope_position_ids

    model, processor = loaded
    inputs = hf_inputs(processor, IMAGE_PROMPT, image)
    with torch.no_grad():
        got = model(**inputs).logits[0]

    vlm_config = AutoConfig.from_pretrained(tiny["qwen2_5_vl"])
    vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(vlm_config.vision_config, dtype=torch.float32)
    vlm_state = {}
    for shard in Path(tiny["qwen2_5_vl"]).glob("*.safetensors"):
        vlm_state.update({k[len("visual."):]: v.float() for k, v in load_file(shard).items()
                          if k.startswith("visual.")})
    vision.load_state_dict(vlm_state, strict=True)
    export = load_file(merge_dirs["untied"] / "model.safetensors")
    qwen3 = AutoModelForCausalLM.from_pretrained(tiny["qwen3"], dtype=torch.float32).eval()
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    with torch.no_grad():
        merged = vision(inputs["pixel_values"].float(), grid_thw=grid).pooler_output
        projected = F.linear(F.gelu(merged), export["visual.merger.mlp.4.weight"].float(),
                             export["visual.merger.mlp.4.bias"].float())
        hidden = qwen3.model.embed_tokens(ids)
        hidden[ids == model.config.image_token_id] = projected
        positions = mrope_position_ids(ids[0], grid, image_token_id=model.config.image_token_id,
                                       video_token_id=model.config.video_token_id, spatial_merge_size=2)
        text = model.config.text_config
        cos_sin = _mrope_cos_sin(positions, text.head_dim, text.rope_parameters["rope_theta"],
                                 text.rope_parameters["mrope_section"])
        for layer in qwen3.model.layers:  # no mask: SDPA's causal path
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)
        want = qwen3.lm_head(qwen3.model.norm(hidden))[0]
    assert int((ids == model.config.image_token_id).sum()) == 12
    # fp32 throughout; cos/sin computed in float64 then rounded, window attention reorders
    # patches: differences stay at float32 rounding of O(1) activations.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_rope_index_is_the_project_rule(loaded):
    from qwen_merge_mcore.positions import mrope_position_ids

    model, _ = loaded
    cfg = model.config
    image, video = cfg.image_token_id, cfg.video_token_id
    image_grid, video_grid = torch.tensor([[1, 4, 6]]), torch.tensor([[3, 4, 4]])
    row = [1, 11, 12, 3] + [image] * 6 + [4, 13, 3] + [video] * 12 + [4, 14, 15]
    ids = torch.tensor([[0, 0] + row])  # two left-padding tokens
    mask = torch.tensor([[0, 0] + [1] * len(row)])
    got, deltas = model.get_rope_index(ids, image_grid, video_grid, torch.tensor([0.5]), mask)
    want = mrope_position_ids(torch.tensor(row), image_grid, video_grid, [0.5], image_token_id=image,
                              video_token_id=video, spatial_merge_size=2,
                              tokens_per_second=cfg.vision_config.tokens_per_second)
    assert torch.equal(got[:, 0, 2:], want)
    assert int(deltas[0, 0]) == int(want.max()) + 1 - len(row)


def test_generate_with_cache_equals_recomputation(loaded, image):
    """`generate` (KV cache + cached rope deltas) gives the tokens of a cache-free greedy loop
    that recomputes every position from the whole sequence."""
    model, processor = loaded
    for content, img in ((TEXT_PROMPT, None), (IMAGE_PROMPT, image)):
        got = hf_greedy(model, processor, content, img)
        inputs = dict(hf_inputs(processor, content, img))
        ids = inputs.pop("input_ids")
        inputs.pop("attention_mask")
        want = []
        with torch.no_grad():
            for _ in got:
                model.rope_deltas = None
                step = model(input_ids=ids, use_cache=False, **inputs).logits[0, -1].argmax()
                want.append(int(step))
                ids = torch.cat([ids, step.view(1, 1)], dim=1)
        assert got == want, content


def test_decode_step_uses_cached_rope_deltas(loaded, image):
    """A decoding step given only the new token and the cache (no position ids) is placed with
    the rope delta cached from the image prompt, as a full recomputation places it."""
    model, processor = loaded
    inputs = dict(hf_inputs(processor, IMAGE_PROMPT, image))
    inputs.pop("mm_token_type_ids", None)
    with torch.no_grad():
        model.rope_deltas = None
        prompt = model(**inputs, use_cache=True)
        token = prompt.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=mask, past_key_values=prompt.past_key_values,
                     use_cache=True).logits[0, -1]
        model.rope_deltas = None
        full = model(input_ids=torch.cat([inputs["input_ids"], token], dim=1), pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"]).logits[0, -1]
    # 12 image tokens on a 3x4 merged grid take 4 positions: the text after them is 8 behind.
    assert prompt.rope_deltas.tolist() == [[-8]]
    # fp32, cached vs recomputed K/V; ignoring the delta moves logits by ~0.1.
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)


REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoProject(importlib.abc.MetaPathFinder):
        # The machine without this package: however it was installed (editable or not),
        # nothing can import it, so the remote code must stand alone.

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "qwen_merge_mcore":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoProject())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        import qwen_merge_mcore
        raise AssertionError("qwen_merge_mcore is importable")
    except ModuleNotFoundError:
        pass
    folder, image, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    out = {"model": type(model).__module__, "tokens": []}
    for text, with_image in prompts:
        images = [Image.open(image).convert("RGB")] if with_image else None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        out["tokens"].append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    print("RESULT " + json.dumps(out))
""")


def test_remote_code_without_package(loaded, merge_dirs, image, tmp_path):
    """A fresh interpreter that cannot import qwen_merge_mcore (isolated mode, run outside the
    repo, the package hidden even where it is pip-installed) loads the folder through its remote
    code and generates the same tokens."""
    from .helpers import chat_prompt

    model, processor = loaded
    cases = [(TEXT_PROMPT, None), (IMAGE_PROMPT, image)]
    prompts = [(chat_prompt(processor, content), img is not None) for content, img in cases]
    want = [hf_greedy(model, processor, content, img) for content, img in cases]
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-I", str(script), str(merge_dirs["untied"]), str(image),
                          json.dumps(prompts)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["model"].startswith("transformers_modules.")  # loaded from the folder's files
    assert result["tokens"] == want


@pytest.mark.parametrize("case", ["missing_shard", "other_size", "plain_vlm"])
def test_bad_folder_is_reported(bad_folders, case):
    from transformers import AutoModelForImageTextToText

    from qwen_merge_mcore.hf import CheckpointError

    folder, message = bad_folders[case]
    with pytest.raises(CheckpointError, match=message):
        AutoModelForImageTextToText.from_pretrained(folder)


def test_config_of_another_model_type_is_reported(bad_folders):
    # AutoModel would pick Qwen3's own class for a qwen3 config.json; loading it as Qwen-Merge
    # (what a user of this model class does) must say that the config is not Qwen-Merge's.
    from qwen_merge_mcore.hf import Qwen2_5_VL_MergeForConditionalGeneration

    folder, message = bad_folders["qwen3_config"]
    with pytest.raises(ValueError, match=message):
        Qwen2_5_VL_MergeForConditionalGeneration.from_pretrained(folder)


def test_write_remote_code_refuses_other_models(tiny):
    from qwen_merge_mcore.hf import write_remote_code

    with pytest.raises(ValueError, match="model_type 'qwen3', not 'qwen2_5_vl_merge'"):
        write_remote_code(tiny["qwen3"])
