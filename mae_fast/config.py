"""Typed run configuration: YAML (or the seed guide's JSON) -> dataclasses, strictly checked.

Sections and key names follow the seed guide (model, optimization, schedule, data,
checkpointing, logging, misc). Every error names the dotted key; a misspelt key also
names the closest valid one. Nothing here touches the GPU or the data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    type: str = "mae_vit_base_patch16"
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    embed_kept_only: bool = False  # patch-embed only the kept patches (same numbers; skips 3/4 of that work)


@dataclass
class OptimizationConfig:
    batch_size: int = 4096  # effective batch: micro_batch_size x accumulation x world size
    micro_batch_size: int | None = None  # per GPU and step; None = batch_size / world size (no accumulation)
    base_lr: float = 1.5e-4  # per 256 images: lr = base_lr * batch_size / 256
    lr: float | None = None  # absolute lr; when set, base_lr is ignored
    min_lr: float = 0.0
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    gradient_clip: float = 0.0  # global-norm clip; 0 = off (the paper does not clip)


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: int = 40
    start_epoch: int = 0
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch; None = images // batch_size


@dataclass
class AugmentationConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio range
    hflip_prob: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "cubic"


@dataclass
class DataConfig:
    data_path: str = "./data/imagenet/train"
    backend: str = "dali"  # dali | pil | synthetic
    input_size: int = 224
    num_workers: int = 10  # DALI threads, or PIL DataLoader workers
    pin_memory: bool = True
    prefetch: int = 2  # batches DALI prepares ahead
    output_dtype: str = "float16"  # float16 | uint8 (DALI output; normalized in the step when uint8)
    decoder: str = "auto"  # JPEG decode: auto/mixed (the GPU's decoder when there is a GPU) | cpu (rest still on GPU)
    hw_decoder_load: float | None = None  # DALI's share for the hardware JPEG decoder; None = DALI default
    synthetic_images: int = 1281167  # images per epoch with backend synthetic (ImageNet-1k's train size)
    make_sample: bool = False  # create a sample data set at data_path when it is missing (demo)
    scan_cache_dir: str = ""  # where the checked file list is cached; "" = in data_path itself
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class CheckpointingConfig:
    checkpoint_dir: str = "./checkpoints"
    save_freq_epochs: int = 50  # 0 = never
    save_freq_steps: int = 10000  # 0 = never
    keep_last_n: int = 5  # numbered checkpoint directories kept; 0 = all


@dataclass
class LoggingConfig:
    print_freq: int = 100  # steps between metric reads (the only host sync in the loop)
    console_clear_freq: int = 100  # accepted for seed compatibility; the dashboard redraws in place
    output_dir: str = "./output"  # log file, metrics.jsonl, resolved config
    dashboard: bool | str = "auto"  # auto (when stdout is a terminal) | on | off (YAML reads on/off as booleans)
    tensorboard: bool = False
    visualize_freq_epochs: int = 0  # save a reconstruction grid of fixed sample images every N epochs; 0 = off
    visualize_images: int = 4  # rows in that grid (images spread over the data set)


@dataclass
class MiscConfig:
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile the training step
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune(-no-cudagraphs)
    compile_optimizer: bool = False  # also compile grad norm + AdamW (foreach, capturable) instead of fused AdamW
    attention: str = (
        "auto"  # scaled-dot-product attention kernel: auto (PyTorch picks) | flash | efficient | cudnn | math
    )
    high_priority_stream: bool = False  # train on a high-priority CUDA stream; DALI's GPU work fills the gaps
    precision: str = "amp"  # amp: bf16 autocast over fp32 weights | bf16: bf16 weights and activations, fp32 masters
    auto_resume: bool = False
    resume: str = ""  # path of a mae-fast checkpoint to resume from (weights, optimizer, schedule, data position)
    init_weights: str = ""  # start from these weights only (mae-fast or facebookresearch/mae checkpoint)
    run_name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    misc: MiscConfig = field(default_factory=MiscConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building dataclasses from plain dicts, strictly --------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, lists stay lists)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message says more
            raise errors[0]
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string: accept numeric strings
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (valid keys here: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing section, or one left empty in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """["optimization.base_lr=1e-4", ...] -> [("optimization.base_lr", 1e-4), ...] (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optimization.base_lr=1e-4")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Config:
    data = dict(data or {})
    data.pop("derived", None)  # a saved resolved config (config.yaml/config.json of a run) loads as is: recomputed
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML (or JSON) config file; unknown keys, wrong types and impossible values raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Values that cannot work, caught before any model or data is touched."""
    from .model import ATTENTION_KERNELS, PRESETS  # local: the model module imports torch

    m, o, s, d, c, lg, x = cfg.model, cfg.optimization, cfg.schedule, cfg.data, cfg.checkpointing, cfg.logging, cfg.misc
    if m.type not in PRESETS:
        close = difflib.get_close_matches(m.type, list(PRESETS), n=1)
        _check(
            False,
            "model.type",
            f"unknown model {m.type!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (presets: {', '.join(PRESETS)})",
        )
    _check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", f"must be in (0, 1), got {m.mask_ratio}")
    _check(o.batch_size > 0, "optimization.batch_size", f"must be positive, got {o.batch_size}")
    if o.micro_batch_size is not None:
        _check(o.micro_batch_size > 0, "optimization.micro_batch_size", f"must be positive, got {o.micro_batch_size}")
        _check(
            o.batch_size % o.micro_batch_size == 0,
            "optimization.batch_size",
            f"{o.batch_size} is not divisible by optimization.micro_batch_size {o.micro_batch_size}",
        )
    _check(o.base_lr > 0, "optimization.base_lr", f"must be positive, got {o.base_lr}")
    _check(o.lr is None or o.lr > 0, "optimization.lr", f"must be positive, got {o.lr}")
    _check(o.min_lr >= 0, "optimization.min_lr", f"must be >= 0, got {o.min_lr}")
    _check(o.weight_decay >= 0, "optimization.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.optimizer.lower() == "adamw", "optimization.optimizer", f"only 'adamw' is supported, got {o.optimizer!r}")
    _check(0 <= o.adam_beta1 < 1, "optimization.adam_beta1", f"must be in [0, 1), got {o.adam_beta1}")
    _check(0 <= o.adam_beta2 < 1, "optimization.adam_beta2", f"must be in [0, 1), got {o.adam_beta2}")
    _check(o.gradient_clip >= 0, "optimization.gradient_clip", f"must be >= 0, got {o.gradient_clip}")
    _check(s.epochs > 0, "schedule.epochs", f"must be positive, got {s.epochs}")
    _check(
        0 <= s.warmup_epochs <= s.epochs,
        "schedule.warmup_epochs",
        f"must be in [0, epochs={s.epochs}], got {s.warmup_epochs}",
    )
    _check(
        0 <= s.start_epoch < s.epochs, "schedule.start_epoch", f"must be in [0, epochs={s.epochs}), got {s.start_epoch}"
    )
    _check(
        s.steps_per_epoch is None or s.steps_per_epoch > 0,
        "schedule.steps_per_epoch",
        f"must be positive, got {s.steps_per_epoch}",
    )
    _check(
        d.backend in ("dali", "pil", "synthetic"), "data.backend", f"must be dali, pil or synthetic, got {d.backend!r}"
    )
    patch = PRESETS[m.type].patch_size
    _check(
        d.input_size > 0 and d.input_size % patch == 0,
        "data.input_size",
        f"must be a positive multiple of the patch size {patch} of {m.type}, got {d.input_size}",
    )
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.prefetch >= 1, "data.prefetch", f"must be >= 1, got {d.prefetch}")
    _check(
        d.output_dtype in ("float16", "uint8"), "data.output_dtype", f"must be float16 or uint8, got {d.output_dtype!r}"
    )
    _check(d.decoder in ("auto", "mixed", "cpu"), "data.decoder", f"must be auto, mixed or cpu, got {d.decoder!r}")
    _check(
        d.hw_decoder_load is None or 0 <= d.hw_decoder_load <= 1,
        "data.hw_decoder_load",
        f"must be in [0, 1], got {d.hw_decoder_load}",
    )
    _check(d.synthetic_images > 0, "data.synthetic_images", f"must be positive, got {d.synthetic_images}")
    a = d.augmentation
    for key, pair in (("crop_scale", a.crop_scale), ("crop_ratio", a.crop_ratio)):
        _check(
            len(pair) == 2 and 0 < pair[0] <= pair[1],
            f"data.augmentation.{key}",
            f"must be [low, high] with 0 < low <= high, got {pair}",
        )
    _check(a.crop_scale[1] <= 1.0, "data.augmentation.crop_scale", f"area fraction cannot exceed 1, got {a.crop_scale}")
    _check(0 <= a.hflip_prob <= 1, "data.augmentation.hflip_prob", f"must be in [0, 1], got {a.hflip_prob}")
    _check(len(a.mean) == 3, "data.augmentation.mean", f"needs 3 values (RGB), got {a.mean}")
    _check(
        len(a.std) == 3 and all(v > 0 for v in a.std),
        "data.augmentation.std",
        f"needs 3 positive values (RGB), got {a.std}",
    )
    _check(
        a.interpolation in ("cubic", "linear", "nearest", "lanczos"),
        "data.augmentation.interpolation",
        f"must be cubic, linear, nearest or lanczos, got {a.interpolation!r}",
    )
    for key in ("save_freq_epochs", "save_freq_steps", "keep_last_n"):
        _check(getattr(c, key) >= 0, f"checkpointing.{key}", f"must be >= 0, got {getattr(c, key)}")
    _check(lg.print_freq > 0, "logging.print_freq", f"must be positive, got {lg.print_freq}")
    _check(
        lg.visualize_freq_epochs >= 0, "logging.visualize_freq_epochs", f"must be >= 0, got {lg.visualize_freq_epochs}"
    )
    _check(lg.visualize_images > 0, "logging.visualize_images", f"must be positive, got {lg.visualize_images}")
    if isinstance(lg.dashboard, bool):
        lg.dashboard = "on" if lg.dashboard else "off"
    _check(lg.dashboard in ("auto", "on", "off"), "logging.dashboard", f"must be auto, on or off, got {lg.dashboard!r}")
    _check(
        x.device in ("auto", "cuda", "cpu") or (x.device.startswith("cuda:") and x.device[5:].isdigit()),
        "misc.device",
        f"must be auto, cuda, cuda:N or cpu, got {x.device!r}",
    )
    _check(
        x.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "misc.compile_mode",
        f"unknown torch.compile mode {x.compile_mode!r}",
    )
    _check(x.precision in ("amp", "bf16"), "misc.precision", f"must be amp or bf16, got {x.precision!r}")
    _check(
        x.attention in ATTENTION_KERNELS,
        "misc.attention",
        f"must be one of {', '.join(ATTENTION_KERNELS)}, got {x.attention!r}",
    )


# -- derived values -------------------------------------------------------------------------------


@dataclass
class Derived:
    """Values computed once from the config and the data set; printed and saved with the run."""

    world_size: int
    micro_batch_size: int  # per process and forward/backward
    accum_steps: int  # micro-batches per optimizer step and process
    effective_batch: int  # micro_batch_size * accum_steps * world_size == optimization.batch_size
    lr: float  # absolute peak lr
    lr_rule: str
    num_images: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    start_step: int


def derive(cfg: Config, num_images: int, world_size: int = 1) -> Derived:
    o, s = cfg.optimization, cfg.schedule
    _check(
        o.batch_size % world_size == 0,
        "optimization.batch_size",
        f"{o.batch_size} is not divisible by the world size {world_size}",
    )
    micro = o.micro_batch_size or o.batch_size // world_size
    _check(
        o.batch_size % (micro * world_size) == 0,
        "optimization.batch_size",
        f"{o.batch_size} is not divisible by micro_batch_size {micro} x world size {world_size}",
    )
    accum = o.batch_size // (micro * world_size)
    if o.lr is not None:
        lr, rule = o.lr, f"lr = {o.lr:g} (absolute, optimization.lr)"
    else:
        lr = o.base_lr * o.batch_size / 256  # MAE linear scaling rule
        rule = f"lr = base_lr * batch_size / 256 = {o.base_lr:g} * {o.batch_size} / 256 = {lr:g}"
    _check(o.min_lr <= lr, "optimization.min_lr", f"{o.min_lr:g} is above the peak lr {lr:g} ({rule})")
    steps = num_images // o.batch_size  # the last partial batch is dropped
    if s.steps_per_epoch is not None:  # a cap; synthetic data has no natural epoch, so it may set any length
        steps = s.steps_per_epoch if cfg.data.backend == "synthetic" else min(steps, s.steps_per_epoch)
    _check(
        steps > 0,
        "optimization.batch_size",
        f"{o.batch_size} is larger than the data set ({num_images} images in data.data_path "
        f"{cfg.data.data_path}): no full step per epoch",
    )
    return Derived(
        world_size=world_size,
        micro_batch_size=micro,
        accum_steps=accum,
        effective_batch=o.batch_size,
        lr=lr,
        lr_rule=rule,
        num_images=num_images,
        steps_per_epoch=steps,
        total_steps=steps * s.epochs,
        warmup_steps=steps * s.warmup_epochs,
        start_step=steps * s.start_epoch,
    )


def lr_warnings(cfg: Config) -> list[str]:
    o = cfg.optimization
    if o.lr is None and o.base_lr >= 1e-3:
        scaled = o.base_lr * o.batch_size / 256
        return [
            f"optimization.base_lr {o.base_lr:g} looks already scaled (MAE's base_lr is 1.5e-4 per 256 images); "
            f"it gives lr {scaled:g} at batch {o.batch_size}. To use {o.base_lr:g} as the lr, set optimization.lr instead."
        ]
    return []


def resolved(cfg: Config, derived: Derived | None) -> dict[str, Any]:
    """The config with its derived values: what is printed at start and saved with the run."""
    out = cfg.to_dict()
    if derived is not None:
        out["derived"] = dataclasses.asdict(derived)
    return out


def save_config(cfg: Config, derived: Derived | None, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(resolved(cfg, derived), sort_keys=False))


def format_config(cfg: Config, derived: Derived | None = None) -> str:
    return yaml.safe_dump(resolved(cfg, derived), sort_keys=False).rstrip()
