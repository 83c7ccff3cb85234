"""Typed configuration of a Qwen-Merge experiment.

One dataclass per concern; `ExperimentConfig` holds them all and checks the rules that span
sections (heads divisible by TP, layers divisible across pipeline stages, FP8 needs TE).
Field names follow Megatron-Core where a Megatron user would look for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ..fp8_alignment import fp8_sequence_multiple, fp8_token_alignment
from .errors import ConfigError

# The parts of the model that `train.freeze` names (models/qwen_merge.py maps them to modules).
Part = Literal["vision", "projector", "language"]
PARTS: tuple[str, ...] = get_args(Part)


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(key, reason)


def _positive(obj, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{prefix}.{name}", f"must be > 0, got {value}")


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision transformer (`visual.blocks.*`)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels; 112 px = 8x8 patches = 4x4 merged tokens
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # sharded: the ViT's GEMMs split over tensor parallelism like the LLM's. replicated: a frozen
    # ViT lives whole on every TP rank of the first stage, each rank encodes a share of the images
    # (no tiny split GEMMs, and TP need not divide its heads or MLP width).
    parallel: Literal["sharded", "replicated"] = "sharded"

    def validate(self, prefix: str = "model.vision") -> None:
        _positive(self, prefix, "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "in_channels", "window_size")
        _require(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads",
                 f"{self.num_heads} does not divide hidden_size {self.hidden_size}")
        _require((self.hidden_size // self.num_heads) % 4 == 0, f"{prefix}.num_heads",
                 "head_dim must be a multiple of 4 for the 2D rotary embedding")
        unit = self.patch_size * self.spatial_merge_size
        _require(self.window_size % unit == 0, f"{prefix}.window_size",
                 f"{self.window_size} is not a multiple of patch_size*spatial_merge_size = {unit}")
        for i in self.fullatt_block_indexes:
            _require(0 <= i < self.depth, f"{prefix}.fullatt_block_indexes",
                     f"block {i} is outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ProjectorConfig:
    """`visual.merger` of Qwen2.5-VL plus the new `mlp.4` into the LLM width."""

    merger_out_size: int = 8192  # Qwen2.5-VL `out_hidden_size`: output of mlp.2
    # The new mlp.4 (merger_out_size -> LLM hidden). False for a plain Qwen2.5-VL, whose merger
    # already ends in its LLM's width.
    extra_layer: bool = True
    init_std: float = 0.02  # N(0, init_std) for the new mlp.4 weight; its bias starts at 0

    def validate(self, prefix: str = "model.projector") -> None:
        _positive(self, prefix, "merger_out_size", "init_std")


@dataclass
class LanguageConfig:
    """The Qwen3 decoder."""

    num_layers: int = 36
    hidden_size: int = 2560
    num_attention_heads: int = 32
    num_query_groups: int = 8
    head_dim: int = 128
    ffn_hidden_size: int = 9728
    vocab_size: int = 151936
    make_vocab_size_divisible_by: int = 128
    tie_word_embeddings: bool = True
    qk_layernorm: bool = True  # Qwen3: RMSNorm on q and k per head
    add_qkv_bias: bool = False  # Qwen2.5 (the LLM inside a plain Qwen2.5-VL) has q/k/v biases
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 40960

    def validate(self, prefix: str = "model.language") -> None:
        _positive(self, prefix, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by")
        _require(self.num_attention_heads % self.num_query_groups == 0, f"{prefix}.num_query_groups",
                 f"{self.num_query_groups} does not divide num_attention_heads {self.num_attention_heads}")
        _require(len(self.mrope_section) == 3, f"{prefix}.mrope_section", "needs 3 entries (t, h, w)")
        _require(sum(self.mrope_section) * 2 == self.head_dim, f"{prefix}.mrope_section",
                 f"sections {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        unit = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // unit) * unit


@dataclass
class ModelConfig:
    """The whole Qwen-Merge model. `preset` names the shapes it started from (see presets.py)."""

    preset: Optional[str] = None
    # What the checkpoint holds: Qwen-Merge (ViT + projector with mlp.4 + Qwen3), a plain
    # text-only Qwen3, or a plain Qwen2.5-VL (merger without mlp.4, Qwen2.5 LLM).
    architecture: Literal["qwen_merge", "qwen3", "qwen2_5_vl"] = "qwen_merge"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Layer implementation: `te` (Transformer Engine, FP8-capable), `local` (Megatron-Core
    # parallel linears + torch SDPA, runs on CPU), `auto` (te where it imports).
    backend: Literal["auto", "te", "local"] = "auto"

    @property
    def has_vision(self) -> bool:
        return self.architecture != "qwen3"

    def validate(self, prefix: str = "model") -> None:
        self.vision.validate(f"{prefix}.vision")
        self.projector.validate(f"{prefix}.projector")
        self.language.validate(f"{prefix}.language")
        if self.architecture == "qwen2_5_vl":
            _require(not self.projector.extra_layer, f"{prefix}.projector.extra_layer",
                     "a plain Qwen2.5-VL has no mlp.4")
        if not self.projector.extra_layer:
            _require(self.projector.merger_out_size == self.language.hidden_size,
                     f"{prefix}.projector.merger_out_size", "without extra_layer the merger must end in "
                     f"the LLM width {self.language.hidden_size}, got {self.projector.merger_out_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not self.has_vision:
                break
            value = getattr(self, name)
            _require(0 <= value < self.language.vocab_size, f"{prefix}.{name}",
                     f"{value} is outside the vocabulary (size {self.language.vocab_size})")


@dataclass
class ParallelConfig:
    """Model and data parallel layout. The data-parallel size follows from the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Decoder layers on the first pipeline stage, which also holds the ViT and projector.
    # None spreads the layers evenly.
    first_stage_layers: Optional[int] = None

    def __post_init__(self):
        # One virtual stage per pipeline stage is no interleaving. Megatron-Core takes only None
        # for that: given 1, parallel_state refuses PP=1 and expects a vp_stage for every chunk.
        if self.virtual_pipeline_model_parallel_size == 1:
            self.virtual_pipeline_model_parallel_size = None

    def validate(self, prefix: str = "parallel") -> None:
        _positive(self, prefix, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(vpp >= 1, f"{prefix}.virtual_pipeline_model_parallel_size", f"must be >= 1, got {vpp}")
            _require(self.pipeline_model_parallel_size > 1, f"{prefix}.virtual_pipeline_model_parallel_size",
                     "virtual pipeline stages need pipeline_model_parallel_size > 1")
        if self.sequence_parallel:
            _require(self.tensor_model_parallel_size > 1, f"{prefix}.sequence_parallel",
                     "needs tensor_model_parallel_size > 1")
        if self.first_stage_layers is not None:
            _require(self.pipeline_model_parallel_size > 1, f"{prefix}.first_stage_layers",
                     "only meaningful with pipeline_model_parallel_size > 1")
            _require(self.first_stage_layers >= 1, f"{prefix}.first_stage_layers",
                     "must be >= 1 (Megatron needs a decoder layer on every stage)")
            _require(vpp is None, f"{prefix}.first_stage_layers",
                     "an uneven first stage cannot be combined with virtual pipeline stages")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def stage_layer_counts(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage (first stage may hold `first_stage_layers`)."""
        pp = self.pipeline_model_parallel_size
        if self.first_stage_layers is None:
            return [num_layers // pp] * pp
        rest = num_layers - self.first_stage_layers
        return [self.first_stage_layers] + [rest // (pp - 1)] * (pp - 1)


@dataclass
class PrecisionConfig:
    """bf16 everywhere; FP8 (Transformer Engine) optional on the decoder."""

    params_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None  # FP8 format; None = no FP8
    # Tensorwise current scaling is the default: delayed scaling cannot keep the first/last
    # layers in bf16 (Megatron refuses), so it would run them in FP8.
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    fp8_margin: int = 0
    fp8_vision: bool = False  # the ViT stays in bf16 unless asked (its MLP width 3420 is not FP8-aligned)
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def validate(self, prefix: str = "precision") -> None:
        _positive(self, prefix, "fp8_amax_history_len")
        for name in ("fp8_margin", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")


@dataclass
class TrainConfig:
    """Optimizer, LR schedule, batch sizes, freezing and the step's engine."""

    stage: str = "stage3"
    lr: float = 5e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.05
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # Samples per optimizer step (the recipe's batch). Each step packs them into exactly DP x M
    # micro-batches of at most data.seq_length tokens, M chosen per step (data/packing.py).
    global_batch_samples: int = 128
    micro_batch_size: int = 1
    epochs: Optional[float] = None  # one of epochs / train_iters sets the length
    train_iters: Optional[int] = None
    seed: int = 1234
    freeze: list[Part] = field(default_factory=lambda: ["vision"])
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    max_nan_steps: int = 10  # abort after this many skipped non-finite steps
    engine: Literal["auto", "gpu", "cpu"] = "auto"

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, "lr", "adam_eps", "global_batch_samples", "micro_batch_size")
        _require(self.micro_batch_size == 1, f"{prefix}.micro_batch_size", "must be 1: a micro-batch is one packed "
                 "sequence of samples (THD); size micro-batches with data.seq_length")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for beta in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, beta) < 1, f"{prefix}.{beta}", f"must lie in [0, 1), got {getattr(self, beta)}")
        _require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must lie in [0, lr={self.lr}]")
        _require(0 <= self.lr_warmup_fraction < 1, f"{prefix}.lr_warmup_fraction", "must lie in [0, 1)")
        _require(self.clip_grad >= 0, f"{prefix}.clip_grad", "must be >= 0 (0 disables clipping)")
        _require(self.epochs is not None or self.train_iters is not None, f"{prefix}.train_iters",
                 "set train_iters or epochs")
        if self.epochs is not None:
            _require(self.epochs > 0, f"{prefix}.epochs", "must be > 0")
        if self.train_iters is not None:
            _require(self.train_iters > 0, f"{prefix}.train_iters", "must be > 0")
        _require(len(set(self.freeze)) == len(self.freeze), f"{prefix}.freeze", "lists a part twice")
        _require(len(self.freeze) < len(PARTS), f"{prefix}.freeze", "freezes every part: nothing would train")
        if self.recompute_method is not None or self.recompute_num_layers is not None:
            _require(self.recompute_granularity == "full", f"{prefix}.recompute_method",
                     "recompute_method/num_layers apply to recompute_granularity=full only")


@dataclass
class DatasetConfig:
    """One source in the weighted mix (see qwen_merge_mcore/data/mixture.py)."""

    path: str = ""  # a .jsonl/.parquet file, a folder of them, or a glob
    format: Literal["auto", "messages", "sharegpt", "llamafactory"] = "auto"
    # Relative rate at which this source is drawn; None on every dataset spreads each evenly
    # over the pass. Set it on all datasets or on none.
    weight: Optional[float] = None
    epochs: float = 1.0  # samples per pass = round(epochs x rows); 1.2 = one epoch + a random 20%
    data_root: Optional[str] = None  # image paths are relative to this (default: the file's folder)
    name: Optional[str] = None

    def validate(self, prefix: str) -> None:
        _require(bool(self.path), f"{prefix}.path", "is required")
        _positive(self, prefix, "epochs")
        if self.weight is not None:
            _positive(self, prefix, "weight")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    template: Literal["pretrain", "qwen3"] = "qwen3"
    tokenizer: Optional[str] = None  # folder with the tokenizer; default: the model checkpoint's
    seq_length: int = 8096
    # Packed sequences are padded to a multiple of this; FP8 needs one (checked per recipe and TP)
    pad_to_multiple_of: int = 16
    min_pixels: int = 3136
    max_pixels: int = 262144
    video_fps: float = 2.0
    video_max_frames: int = 64
    video_max_pixels: int = 50176
    # How a step's samples become DP x M micro-batches (data/packing.py): `flop_balanced` evens the
    # ranks' training FLOPs (perf/flops.py), `first_fit_decreasing` deals the FFD bins (the baseline).
    packing: Literal["flop_balanced", "first_fit_decreasing"] = "flop_balanced"
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples is unusable
    num_workers: int = 2
    shuffle: bool = True
    # Folder of cached ViT features (frozen ViT only): images seen before skip decoding and the ViT.
    vision_cache: Optional[str] = None

    def validate(self, prefix: str = "data") -> None:
        for i, ds in enumerate(self.datasets):
            ds.validate(f"{prefix}.datasets[{i}]")
        weighted = [ds.weight is not None for ds in self.datasets]
        _require(all(weighted) or not any(weighted), f"{prefix}.datasets",
                 "set weight on every dataset or on none")
        _positive(self, prefix, "seq_length", "pad_to_multiple_of", "min_pixels", "max_pixels", "video_fps",
                  "video_max_frames", "video_max_pixels")
        _require(self.min_pixels <= self.max_pixels, f"{prefix}.min_pixels", "exceeds max_pixels")
        _require(0 <= self.max_bad_fraction <= 1, f"{prefix}.max_bad_fraction", "must lie in [0, 1]")
        _require(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")


@dataclass
class CheckpointConfig:
    pretrained: Optional[str] = None  # weights-only start (previous stage or converted checkpoint)
    save: Optional[str] = None  # run folder: iter_NNNNNNN/ checkpoints and `latest`
    save_interval: int = 1000
    keep_last: int = 3
    async_save: bool = False  # GPU only
    # Also write a Hugging Face folder (`iter_NNNNNNN/hf/`, what `qmm mcore2hf` would make of the
    # checkpoint) at every save, streamed by the ranks.
    save_hf: bool = False

    def validate(self, prefix: str = "checkpoint") -> None:
        _positive(self, prefix, "save_interval", "keep_last")
        _require(self.save is not None or not self.save_hf, f"{prefix}.save_hf",
                 "needs checkpoint.save (the HF folder goes beside each saved checkpoint)")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    progress_bar: Optional[bool] = None  # None: on when stdout is a terminal
    summary_json: Optional[str] = None
    # Peak dense TFLOP/s of one accelerator, for MFU; None: known GPUs by name (H100 989 bf16,
    # doubled under FP8), no MFU on CPU.
    peak_tflops: Optional[float] = None

    def validate(self, prefix: str = "logging") -> None:
        _positive(self, prefix, "log_interval")
        if self.peak_tflops is not None:
            _positive(self, prefix, "peak_tflops")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for section in ("model", "parallel", "precision", "train", "data", "checkpoint", "logging"):
            getattr(self, section).validate()
        validate_layout(self.model, self.parallel)
        if self.data.vision_cache is not None:
            _require(self.model.has_vision and "vision" in self.train.freeze, "data.vision_cache",
                     "caches the features of a frozen ViT: the model needs a ViT and train.freeze must list 'vision'")
        if self.model.has_vision and self.model.vision.parallel == "replicated":
            _require("vision" in self.train.freeze, "model.vision.parallel",
                     "replicated needs the ViT frozen (train.freeze lists 'vision'): each TP rank encodes "
                     "different images, so ViT gradients would not be reduced")
        # The planner models CP layouts (its references use them); training does not run them.
        _require(self.parallel.context_parallel_size == 1, "parallel.context_parallel_size",
                 f"context parallelism is not implemented (nothing splits a packed sequence's tokens per CP "
                 f"rank or reduces the loss over CP); got {self.parallel.context_parallel_size}, use 1")
        if self.precision.fp8 is not None:
            _require(self.model.backend != "local", "precision.fp8",
                     "FP8 needs the Transformer Engine backend, but model.backend is 'local'")
            par, recipe = self.parallel, self.precision.fp8_recipe
            multiple = fp8_sequence_multiple(recipe, par.tensor_model_parallel_size, par.sequence_parallel)
            split = f" x TP {par.tensor_model_parallel_size} (sequence parallel)" if par.sequence_parallel else ""
            _require(self.data.pad_to_multiple_of % multiple == 0, "data.pad_to_multiple_of",
                     f"{self.data.pad_to_multiple_of} is not a multiple of {multiple}: {recipe} FP8 needs "
                     f"{fp8_token_alignment(recipe, par.sequence_parallel)} tokens per rank{split}; set "
                     f"data.pad_to_multiple_of={multiple}")

    def data_parallel_size(self, world_size: int) -> int:
        """DP on `world_size` GPUs; refuses a world the layout or the batch cannot use."""
        mp = self.parallel.model_parallel_size
        _require(world_size > 0 and world_size % mp == 0, "parallel",
                 f"world size {world_size} is not a multiple of TP x PP x CP = {mp}")
        dp = world_size // mp
        per_rank = self.train.micro_batch_size
        _require(self.train.global_batch_samples >= dp * per_rank, "train.global_batch_samples",
                 f"{self.train.global_batch_samples} samples per step cannot give each of the {dp} data-parallel "
                 f"ranks ({world_size} GPUs / TP x PP x CP {mp}) {per_rank} sample(s); use at least {dp * per_rank} "
                 f"or fewer data-parallel ranks")
        return dp


# Keys that were renamed or removed: the hint replaces "unknown key".
RETIRED_KEYS = {
    "train.global_batch_size": "batches are counted in samples now: set train.global_batch_samples (the "
                               "recipe's samples per step, e.g. 256 for stage 1) instead of packed sequences",
}


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The parallel layout must split the model's heads, groups and layers evenly."""
    tp = parallel.tensor_model_parallel_size
    lang, vis = model.language, model.vision
    key = "parallel.tensor_model_parallel_size"
    _require(lang.num_attention_heads % tp == 0, key,
             f"{tp} does not divide model.language.num_attention_heads={lang.num_attention_heads}")
    _require(lang.num_query_groups % tp == 0, key,
             f"{tp} does not divide model.language.num_query_groups={lang.num_query_groups} (KV heads)")
    # Column/row-parallel MLPs split their width over TP (Megatron's divide() asserts it).
    _require(lang.ffn_hidden_size % tp == 0, key,
             f"{tp} does not divide model.language.ffn_hidden_size={lang.ffn_hidden_size}")
    if model.has_vision:
        # Also for a replicated ViT: the projector shares its TransformerConfig at the real TP.
        _require(vis.num_heads % tp == 0, key, f"{tp} does not divide model.vision.num_heads={vis.num_heads}")
    if model.has_vision and vis.parallel == "sharded":
        _require(vis.intermediate_size % tp == 0, key,
                 f"{tp} does not divide model.vision.intermediate_size={vis.intermediate_size} (ViT MLP width; "
                 "a frozen ViT can use model.vision.parallel: replicated)")
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    layers = lang.num_layers
    if parallel.first_stage_layers is not None:
        first = parallel.first_stage_layers
        _require(first <= layers, "parallel.first_stage_layers",
                 f"{first} exceeds model.language.num_layers={layers}")
        rest = layers - first
        _require(rest % (pp - 1) == 0, "parallel.first_stage_layers",
                 f"the remaining {rest} decoder layers do not divide across the other {pp - 1} stages")
    else:
        _require(layers % (pp * vpp) == 0, "parallel.pipeline_model_parallel_size",
                 f"model.language.num_layers={layers} does not divide into {pp} stages x {vpp} virtual chunks")
