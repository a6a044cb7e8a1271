"""Typed run configuration: YAML (or the seed guide's JSON) -> dataclasses, strictly checked.

Sections and key names follow the seed guide (model, optimization, schedule, data,
checkpointing, logging, misc), plus evaluation. Each section checks its own values in __post_init__, next to
their fields; choices are Literal types, checked generically. Every error names the dotted
key; a misspelt key also names the closest valid one. Nothing here imports torch or touches
the GPU or the data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .pipelines.common import Augmentation
from .pipelines.store import redact
from .presets import PRESETS


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def _check(ok: bool, key: str, msg: str) -> None:
    """Inside a section's __post_init__: `key` is the field's name; _build adds the section's."""
    if not ok:
        raise ValueError(f"{key}: {msg}")


# Keys of the seed guide's configs that mae-fast accepts and ignores, so those configs load as they are:
IGNORED_KEYS = {
    "logging.console_clear_freq": "the dashboard redraws in place",
    "optimization.optimizer": "the optimizer is always AdamW, as in MAE (any other value is refused)",
}


@dataclass
class ModelConfig:
    type: str = "mae_vit_base_patch16"  # a name in presets.PRESETS
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    embed_kept_only: bool = False  # patch-embed only the kept patches (same numbers; skips 3/4 of that work)

    def __post_init__(self) -> None:
        if self.type not in PRESETS:
            close = difflib.get_close_matches(self.type, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _check(False, "type", f"unknown model {_excerpt(self.type)}{hint} (presets: {', '.join(PRESETS)})")
        _check(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")


@dataclass
class OptimizationConfig:
    batch_size: int = 4096  # effective batch: micro_batch_size x accumulation x world size
    micro_batch_size: int | None = None  # per GPU and step; None = batch_size / world size (no accumulation)
    base_lr: float = 1.5e-4  # per 256 images: lr = base_lr * batch_size / 256
    lr: float | None = None  # absolute lr; when set, base_lr is ignored
    min_lr: float = 0.0
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # see IGNORED_KEYS
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    gradient_clip: float = 0.0  # global-norm clip; 0 = off (the paper does not clip)

    def __post_init__(self) -> None:
        b, micro = self.batch_size, self.micro_batch_size
        _check(0 < b <= 2**24, "batch_size", f"must be in [1, 2**24], got {b}")
        if micro is not None:
            _check(micro > 0, "micro_batch_size", f"must be positive, got {micro}")
            _check(b % micro == 0, "batch_size", f"{b} is not divisible by optimization.micro_batch_size {micro}")
        _check(self.base_lr > 0, "base_lr", f"must be positive, got {self.base_lr}")
        _check(self.lr is None or self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.optimizer.lower() == "adamw", "optimizer", f"only 'adamw' is supported, got {self.optimizer!r}")
        _check(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        _check(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        _check(self.gradient_clip >= 0, "gradient_clip", f"must be >= 0, got {self.gradient_clip}")


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: int = 40
    start_epoch: int = 0
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch; None = images // batch_size

    def __post_init__(self) -> None:
        e, spe = self.epochs, self.steps_per_epoch
        _check(e > 0, "epochs", f"must be positive, got {e}")
        _check(0 <= self.warmup_epochs <= e, "warmup_epochs", f"must be in [0, epochs={e}], got {self.warmup_epochs}")
        _check(0 <= self.start_epoch < e, "start_epoch", f"must be in [0, epochs={e}), got {self.start_epoch}")
        _check(spe is None or spe > 0, "steps_per_epoch", f"must be positive, got {spe}")


@dataclass
class DataConfig:
    data_path: str = "./data/imagenet/train"
    # folder: image files (ImageNet-style or flat) | shards: WebDataset tars from make-shards (DALI only)
    # auto: shards when data_path holds a manifest.json or *.tar files (shards.is_shard_path), else folder
    format: Literal["auto", "folder", "shards"] = "auto"
    backend: Literal["dali", "pil", "synthetic"] = "dali"
    input_size: int = 224
    num_workers: int = 10  # DALI threads, or PIL DataLoader workers
    pin_memory: bool = True
    prefetch: int = 2  # batches DALI prepares ahead
    output_dtype: Literal["float16", "uint8"] = "float16"  # DALI's output; uint8 is normalized in the step
    decoder: Literal["auto", "mixed", "cpu"] = "auto"  # JPEG decode: auto/mixed (GPU when there is one) | cpu
    hw_decoder_load: float | None = None  # DALI's share for the hardware JPEG decoder; None = DALI default
    synthetic_images: int = 1281167  # images per epoch with backend synthetic (ImageNet-1k's train size)
    make_sample: bool = False  # create a sample data set at data_path when it is missing (demo)
    scan_cache_dir: str = ""  # where the checked file list is cached ("": in data_path), and index-shards' indexes
    shuffle_buffer: int = 8192  # shards: samples shuffled together per rank; ~2 x this x mean JPEG size of memory
    # shards in an object store (s3://, gs://, http(s)://): settings beyond the standard environment variables,
    # e.g. {allow_http: true, endpoint: http://127.0.0.1:9000, timeout: 60s, retries: 5}; see pipelines/store.py
    storage_options: dict[str, str | int | float | bool] = field(default_factory=dict)
    shards: str = "*.tar"  # shards: the tars of data_path to read (a glob: imagenet1k-train-*.tar)
    augmentation: Augmentation = field(default_factory=Augmentation)  # pipelines.common: checked there

    def __post_init__(self) -> None:
        load = self.hw_decoder_load
        _check(self.input_size > 0, "input_size", f"must be positive, got {self.input_size}")
        most = max(64, 4 * (os.cpu_count() or 1))  # 4 threads a core, and any config's 16 or 32 everywhere
        _check(
            0 <= self.num_workers <= most,
            "num_workers",
            f"must be in [0, {most}] (this machine has {os.cpu_count()} CPU cores), got {self.num_workers}",
        )
        _check(1 <= self.prefetch <= 32, "prefetch", f"must be in [1, 32] batches, got {self.prefetch}")
        _check(load is None or 0 <= load <= 1, "hw_decoder_load", f"must be in [0, 1], got {load}")
        _check(self.synthetic_images > 0, "synthetic_images", f"must be positive, got {self.synthetic_images}")
        _check(self.shuffle_buffer > 0, "shuffle_buffer", f"must be positive, got {self.shuffle_buffer}")


@dataclass
class CheckpointingConfig:
    checkpoint_dir: str = "./checkpoints"
    save_freq_epochs: int = 50  # 0 = never
    save_freq_steps: int = 10000  # 0 = never
    keep_last_n: int = 5  # numbered checkpoint directories kept; 0 = all

    def __post_init__(self) -> None:
        for key in ("save_freq_epochs", "save_freq_steps", "keep_last_n"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class LoggingConfig:
    print_freq: int = 100  # steps between metric reads (the only host sync in the loop)
    console_clear_freq: int = 100  # see IGNORED_KEYS
    output_dir: str = "./output"  # log file, metrics.jsonl, resolved config
    # auto (when stdout is a terminal) | on | off; YAML reads a bare on/off as a boolean, so true/false work too
    dashboard: bool | Literal["auto", "on", "off"] = "auto"
    tensorboard: bool = False
    visualize_freq_epochs: int = 0  # save a reconstruction grid of fixed sample images every N epochs; 0 = off
    visualize_images: int = 4  # rows in that grid (images spread over the data set)
    profile_start_step: int = 0  # torch.profiler from this step (1: the first) for profile_steps steps; 0 = off
    profile_steps: int = 0  # -> output_dir/profile/trace-steps-A-B.json.gz and a top-kernels table in the log
    memory_history: bool = False  # CUDA: record allocations' stack traces, for the snapshot written on out of memory
    wandb_project: str = ""  # Weights & Biases project (pip install mae-fast[wandb]); "" = off
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    wandb_run_name: str = ""  # "" = misc.run_name, or the output_dir's name

    def __post_init__(self) -> None:
        if isinstance(self.dashboard, bool):
            self.dashboard = "on" if self.dashboard else "off"
        vf, vi = self.visualize_freq_epochs, self.visualize_images
        _check(self.print_freq > 0, "print_freq", f"must be positive, got {self.print_freq}")
        _check(vf >= 0, "visualize_freq_epochs", f"must be >= 0, got {vf}")
        _check(vi > 0, "visualize_images", f"must be positive, got {vi}")
        ps, pn = self.profile_start_step, self.profile_steps
        _check(ps >= 0, "profile_start_step", f"must be >= 0, got {ps}")
        _check(pn >= 0, "profile_steps", f"must be >= 0, got {pn}")
        _check((ps > 0) == (pn > 0), "profile_steps" if ps else "profile_start_step", "is 0: set both, or neither")


@dataclass
class EvaluationConfig:
    """kNN (and linear-probe) accuracy of the frozen encoder during pretraining (evaluate.py): a trend monitor.

    Off when train_path is "". With data.make_sample, a missing DIR/train + DIR/val pair is written as the
    labelled sample set first (the demo's)."""

    train_path: str = ""  # labelled images, DIR/<class>/*.JPEG: the kNN bank (and the probe's train set)
    val_path: str = ""  # labelled images; its classes must be among train_path's
    freq_epochs: int = 10  # evaluate at the end of every N-th epoch, and at the end of the run; 0 = at the end only
    max_train_images: int = 10000  # a uniform random subset of train_path as the bank (seeded); 0 = all
    k: int = 20  # neighbours that vote, weighted by exp(similarity / 0.07) (DINO)
    linear_probe: bool = False  # also train MAE's linear probe (BN + Linear) on the cached features
    batch_size: int = 128  # images per forward pass

    def __post_init__(self) -> None:
        _check(
            bool(self.train_path) or not self.val_path,
            "train_path",
            f"is empty but evaluation.val_path is {_excerpt(self.val_path)}: set both, or neither (evaluation off)",
        )
        _check(
            bool(self.val_path) or not self.train_path,
            "val_path",
            f"is empty but evaluation.train_path is {_excerpt(self.train_path)}: set both, or neither (evaluation off)",
        )
        for key in ("freq_epochs", "max_train_images"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(self.k >= 1, "k", f"must be at least 1, got {self.k}")
        _check(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.train_path)


@dataclass
class MiscConfig:
    seed: int = 0
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    compile: bool = True  # torch.compile the training step
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_optimizer: bool = False  # also compile grad norm + AdamW (foreach, capturable) instead of fused AdamW
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"  # SDPA kernel; auto: PyTorch picks
    high_priority_stream: bool = False  # train on a high-priority CUDA stream; DALI's GPU work fills the gaps
    precision: Literal["amp", "bf16"] = "amp"  # amp: bf16 autocast over fp32 weights | bf16: bf16 copy, fp32 masters
    auto_resume: bool = False
    resume: str = ""  # path of a mae-fast checkpoint to resume from (weights, optimizer, schedule, data position)
    init_weights: str = ""  # start from these weights only (mae-fast or facebookresearch/mae checkpoint)
    run_name: str = ""

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32 - 1] (numpy's and DALI's range), got {self.seed}")
        d = self.device
        ok = d in ("auto", "cuda", "cpu") or (d.startswith("cuda:") and d[5:].isdigit())
        _check(ok, "device", f"must be auto, cuda, cuda:N or cpu, got {_excerpt(d)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    misc: MiscConfig = field(default_factory=MiscConfig)

    def __post_init__(self) -> None:  # the checks across sections
        patch, size = PRESETS[self.model.type].patch_size, self.data.input_size
        _check(
            size % patch == 0,
            "data.input_size",
            f"must be a positive multiple of the patch size {patch} of {self.model.type}, got {size}",
        )

    def to_dict(self, redacted: bool = False) -> dict[str, Any]:
        """The config as plain data; `redacted`: credentials in data.storage_options replaced by '***' (what is
        printed, saved beside the run and kept in checkpoints)."""
        out = dataclasses.asdict(self)
        if redacted:
            out["data"]["storage_options"] = redact(out["data"]["storage_options"])
        return out


# -- building dataclasses from plain dicts, strictly --------------------------------------------

_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _excerpt(value: Any, limit: int = 80) -> str:
    """A value as an error message shows it: a bounded repr (a YAML alias bomb is small in memory but its
    full repr is gigabytes), at most `limit` characters."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _choices(options: tuple) -> str:
    words = [str(o) for o in options]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return _choices(typing.get_args(tp))
    return "true or false" if tp is bool else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, lists stay lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be {_describe(tp)}, got {_excerpt(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message says more
            raise errors[0]
        raise ConfigError(f"{key}: must be {', or '.join(_describe(a) for a in args)}, got {_excerpt(value)}")
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_excerpt(value)}")
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_excerpt(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_excerpt(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_excerpt(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {_excerpt(value)}")
        try:
            number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string: accept numeric strings
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {_excerpt(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_excerpt(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_excerpt(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {_excerpt(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]}?" if close else ""
            raise ConfigError(f"{dotted[:80]}: unknown key{hint} (valid keys here: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    try:
        return cls(**kwargs)  # the section checks its values in __post_init__
    except ConfigError:
        raise
    except ValueError as e:  # "field: message" from __post_init__
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing section, or one left empty in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """["optimization.base_lr=1e-4", ...] -> [("optimization.base_lr", 1e-4), ...] (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optimization.base_lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """A checked Config from plain data, `--set KEY=VALUE` overrides applied; raises ConfigError naming the key
    (a bad override is named as `--set KEY=VALUE`, not as the file's)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections (model:, data:, ...), got {_excerpt(data)}")
    data = dict(data or {})
    data.pop("derived", None)  # a saved resolved config (config.yaml/config.json of a run) loads as is: recomputed
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        _set_dotted(data, key, value)
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        bad, _, message = str(e).partition(": ")
        given = [item for item, (key, _) in zip(overrides, parsed) if key == bad or bad.startswith(key + ".")]
        if given:
            raise ConfigError(f"--set {given[-1]}: {bad}: {message}") from None
        raise


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML (or JSON) config file; unknown keys, wrong types and impossible values raise ConfigError."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is this a config file?") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser found
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML/JSON{at}: {' '.join(problem.split())[:300]}") from None
    if data is None:
        raise ConfigError(f"{path}: holds no settings (an empty or truncated file?)")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        if str(e).startswith("--set "):
            raise
        raise ConfigError(f"{path}: {e}") from None


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


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
    _require(
        o.batch_size % world_size == 0,
        "optimization.batch_size",
        f"{o.batch_size} is not divisible by the world size {world_size}",
    )
    micro = o.micro_batch_size or o.batch_size // world_size
    _require(
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
    _require(o.min_lr <= lr, "optimization.min_lr", f"{o.min_lr:g} is above the peak lr {lr:g} ({rule})")
    steps = num_images // o.batch_size  # the last partial batch is dropped
    if s.steps_per_epoch is not None:  # a cap; synthetic data has no natural epoch, so it may set any length
        steps = s.steps_per_epoch if cfg.data.backend == "synthetic" else min(steps, s.steps_per_epoch)
    _require(
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
    """The config with its derived values: what is printed at start and saved with the run (no credentials)."""
    out = cfg.to_dict(redacted=True)
    if derived is not None:
        out["derived"] = dataclasses.asdict(derived)
    return out


def save_config(cfg: Config, derived: Derived | None, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(resolved(cfg, derived), sort_keys=False))


def format_config(cfg: Config, derived: Derived | None = None) -> str:
    return yaml.safe_dump(resolved(cfg, derived), sort_keys=False).rstrip()
