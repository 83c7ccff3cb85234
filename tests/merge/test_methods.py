"""Each merging rule against values worked out by hand on small tensors."""

import pytest
import torch

from qwen_merge_mcore.merging import methods
from qwen_merge_mcore.merging.names import classify, lm_tensors, parse_layers
from qwen_merge_mcore.merging.spec import MergeSpec
from qwen_merge_mcore.merging.stream import merge_tensor, tensor_seed


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_linear_weighted_sum():
    # 0.9 * [1, 2] + 0.1 * [3, 4] = [1.2, 2.2]
    assert torch.allclose(methods.linear([t(1, 2), t(3, 4)], [0.9, 0.1]), t(1.2, 2.2), atol=1e-6)


def test_trim_keeps_top_density_by_magnitude():
    # density 0.4 of 5 entries -> ceil(2.0) = 2 kept: the two largest |d|, -0.5 and 0.4.
    out = methods.trim_top_magnitude(t(0.1, -0.5, 0.3, -0.05, 0.4), 0.4)
    assert torch.equal(out, t(0, -0.5, 0, 0, 0.4))


# Two task vectors that disagree in sign on entries 0 and 1.
D1, D2 = t(1.0, -2.0, 0.5, 0.0), t(-3.0, 1.0, 0.5, 0.2)


def test_ties_sign_election_on_a_disagreement():
    # Summed mass [-2, -1, 1, 0.2] elects signs [-, -, +, +]. Disjoint mean: entry 0 keeps only
    # d2 (-3), entry 1 only d1 (-2), entry 2 both (0.5), entry 3 only the non-zero d2 (0.2).
    # A plain average would give [-1, -0.5, 0.5, 0.1].
    assert torch.equal(methods.ties([D1, D2], [1.0, 1.0], density=1.0), t(-3.0, -2.0, 0.5, 0.2))


def test_ties_weights_decide_the_election():
    # Weights (4, 1): entry 0 mass 4*1 - 3 = +1 -> positive wins, only d1 agrees -> 4*1/4 = 1.
    # Entry 1: -8 + 1 < 0 -> only d1 -> -2. Entry 2: both agree -> (4*0.5 + 0.5)/5 = 0.5. Entry 3: d2 -> 0.2.
    assert torch.allclose(methods.ties([D1, D2], [4.0, 1.0], density=1.0), t(1.0, -2.0, 0.5, 0.2))


def test_ties_trims_before_electing():
    # density 0.5 keeps 2 of 4 per vector: d1 -> [1, -2, 0, 0], d2 -> [-3, 1, 0, 0].
    # Entries 2 and 3 are trimmed away in both: no mass, merged delta 0.
    assert torch.equal(methods.ties([D1, D2], [1.0, 1.0], density=0.5), t(-3.0, -2.0, 0.0, 0.0))


def test_dare_keeps_survivors_rescaled():
    d = torch.linspace(-1, 1, 1000)
    out = methods.dare(d, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], d[kept] / 0.25)  # every survivor is exactly d / density


def test_dare_rescale_keeps_the_expected_task_vector():
    """E[dare(d)] = d. The seed's version (no 1/density) would average to density * d = 0.2 d."""
    density, draws = 0.2, 400
    d = torch.rand(2000) + 0.5  # magnitudes in [0.5, 1.5], away from 0 so ratios are well defined
    gen = torch.Generator().manual_seed(1234)
    mean = sum(methods.dare(d, density, gen) for _ in range(draws)) / draws
    ratio = mean / d
    # Each draw of dare(d)/d is 1/p w.p. p, else 0: mean 1, std sqrt((1-p)/p) = 2. Over 2000 entries
    # x 400 draws the overall mean has std 2/sqrt(8e5) = 0.0022; 0.015 is ~7 sigma.
    assert abs(ratio.mean().item() - 1.0) < 0.015
    # Per entry the mean of 400 draws has std 2/sqrt(400) = 0.1; 0.6 is 6 sigma (over 2000 entries).
    assert (ratio - 1.0).abs().max().item() < 0.6
    # Kept fraction: binomial, std sqrt(0.16 / 8e5) = 0.00045; 0.003 is ~7 sigma.
    kept = sum((methods.dare(d, density, gen) != 0).float().mean() for _ in range(draws)) / draws
    assert abs(kept.item() - density) < 0.003


def _masks(seed_name, n, shape, density):
    return [torch.rand(shape, generator=torch.Generator().manual_seed(tensor_seed(0, seed_name, i))) < density
            for i in range(n)]


def test_dare_linear_and_dare_ties_against_reproduced_masks():
    spec_lin = MergeSpec("dare_linear", ("a", "b"), base="c", weights=(0.7, 0.5), density=0.5)
    spec_ties = MergeSpec("dare_ties", ("a", "b"), base="c", weights=(1.0, 1.0), density=0.5)
    base = torch.randn(64)
    a, b = base + torch.randn(64), base + torch.randn(64)
    name = "model.layers.0.mlp.up_proj.weight"
    m1, m2 = _masks(name, 2, (64,), 0.5)
    r1 = torch.where(m1, (a - base) / 0.5, 0.0)
    r2 = torch.where(m2, (b - base) / 0.5, 0.0)
    expected_lin = base + 0.7 * r1 + 0.5 * r2
    assert torch.allclose(merge_tensor(spec_lin, name, 0, [a, b], base), expected_lin, atol=1e-5)
    # dare_ties by hand: elect per entry the sign of r1 + r2, average the agreeing non-zero survivors.
    sign = torch.sign(r1 + r2)
    agree1, agree2 = (torch.sign(r1) == sign) & (r1 != 0), (torch.sign(r2) == sign) & (r2 != 0)
    count = agree1.float() + agree2.float()
    expected_ties = base + torch.where(count > 0, (r1 * agree1 + r2 * agree2) / count.clamp(min=1), 0.0)
    assert torch.allclose(merge_tensor(spec_ties, name, 0, [a, b], base), expected_ties, atol=1e-5)


def test_dare_is_deterministic_per_name_not_per_order():
    spec = MergeSpec("dare_linear", ("a", "b"), base="c", density=0.3, seed=7)
    base, a, b = torch.zeros(256), torch.ones(256), torch.full((256,), 2.0)
    first = merge_tensor(spec, "model.layers.1.x", 1, [a, b], base)
    merge_tensor(spec, "model.layers.0.x", 0, [a, b], base)  # another tensor in between changes nothing
    assert torch.equal(merge_tensor(spec, "model.layers.1.x", 1, [a, b], base), first)
    assert not torch.equal(merge_tensor(spec, "model.layers.0.x", 0, [a, b], base), first)
    other_seed = MergeSpec("dare_linear", ("a", "b"), base="c", density=0.3, seed=8)
    assert not torch.equal(merge_tensor(other_seed, "model.layers.1.x", 1, [a, b], base), first)


def test_task_vectors_are_taken_against_the_base():
    spec = MergeSpec("ties", ("a", "b"), base="c", density=1.0)
    base = t(10, 10)
    out = merge_tensor(spec, "model.norm.weight", None, [t(11, 9), t(13, 9)], base)
    assert torch.equal(out, t(12, 9))  # deltas [1,-1] and [3,-1]: agree everywhere -> mean [2, -1]


def test_layerswap_keeps_listed_layers_from_the_first_model():
    a, b = t(1, 1), t(3, 5)
    swap = MergeSpec("layerswap", ("a", "b"), layers=frozenset({0, 1}))
    assert torch.equal(merge_tensor(swap, "n", 1, [a, b], None), a)
    assert torch.equal(merge_tensor(swap, "n", 2, [a, b], None), b)  # default weights (0, 1)
    assert torch.equal(merge_tensor(swap, "model.norm.weight", None, [a, b], None), b)
    mixed = MergeSpec("layerswap", ("a", "b"), layers=frozenset({0}), weights=(0.5, 0.5))
    assert torch.equal(merge_tensor(mixed, "n", 3, [a, b], None), t(2, 3))
    assert torch.equal(merge_tensor(mixed, "n", 0, [a, b], None), a)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="ties", models=("a", "b")), "needs --base"),
    (dict(method="linear", models=("a", "b"), base="c"), "does not use --base"),
    (dict(method="layerswap", models=("a", "b")), "needs --layers"),
    (dict(method="linear", models=("a", "b"), weights=(1.0,)), "1 weights for 2 models"),
    (dict(method="ties", models=("a", "b"), base="c", density=0.0), "density"),
    (dict(method="linear", models=("a",)), "at least two"),
    (dict(method="soup", models=("a", "b")), "unknown merge method"),
])
def test_spec_refuses_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeSpec(**kwargs)


def test_language_model_names_in_every_layout():
    assert classify("model.layers.3.mlp.up_proj.weight").key == "layers.3.mlp.up_proj.weight"
    assert classify("model.language_model.layers.3.mlp.up_proj.weight").layer == 3
    assert classify("model.norm.weight").role == "final_norm"
    assert classify("model.embed_tokens.weight").role == "embedding"
    assert classify("lm_head.weight").role == "output"
    for vision in ("visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.4.weight", "model.visual.merger.ln_q.weight"):
        assert classify(vision) is None
    with pytest.raises(ValueError, match="two tensors map"):
        lm_tensors(["model.layers.0.x.weight", "model.language_model.layers.0.x.weight"])


def test_parse_layers():
    assert parse_layers("0-2,5, 7-7") == {0, 1, 2, 5, 7}
    for bad in ("3-1", "a", ""):
        with pytest.raises(ValueError):
            parse_layers(bad)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
def test_sliced_magnitude_cut_equals_kthvalue(density):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.cat([torch.randn(5000, generator=gen).abs(), torch.zeros(300), torch.full((50,), 0.125)])
    magnitudes = magnitudes[torch.randperm(magnitudes.numel(), generator=gen)]
    slices = lambda: iter(magnitudes.split(777))  # noqa: E731
    assert methods.magnitude_threshold_sliced(slices, magnitudes.numel(), density) == \
        methods.magnitude_threshold(magnitudes, density)
