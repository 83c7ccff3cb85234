"""`qmm data check`: run the first samples of a mix through the pipeline (no training) and report."""

from __future__ import annotations

from .loader import build_train_iterator
from .packing import packing_efficiency


def check_mix(data_cfg, model_cfg, tokenizer_dir, samples: int, seed: int) -> str:
    """Parse, tokenise and pack `samples` samples; decode the media of the first bins too."""
    it = build_train_iterator(data_cfg, model_cfg, tokenizer_dir, seed=seed, window=min(samples, 512))
    lengths: list[int] = []
    decoded = 0
    while it.bad.seen < samples and it.pass_index == 0:
        bins = it._build_window()
        lengths += [len(s) for b in bins for s in b]
        for b in bins[:4]:  # media decode is what fails late: try a few bins through DALI
            decoded += it._collate(b) is not None
        it._advance_window()
    counts = dict(it.bad.counts) or {}
    lines = [f"samples checked: {it.bad.seen}, usable: {len(lengths)}, bad: {it.bad.bad} {counts}",
             f"bins decoded through DALI: {decoded}"]
    if lengths:
        eff = packing_efficiency(lengths, it.capacity, data_cfg.pad_to_multiple_of, it.window)
        lines.append(f"tokens per sample: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; "
                     f"packing efficiency into {it.capacity}: {eff:.4f}")
    return "\n".join(lines)
