from pathlib import Path

import pytest
import yaml

from mae_fast.config import ConfigError, config_from_dict, derive, load_config, lr_warnings, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_seed_guide_json_loads_unchanged():
    cfg = load_config(ROOT / "tests/data/seed_mae_pretrain_vit_base.json")
    assert cfg.model.type == "mae_vit_base_patch16" and cfg.model.norm_pix_loss
    assert cfg.optimization.batch_size == 4096 and cfg.optimization.gradient_clip == 1.0
    assert cfg.schedule.epochs == 1600 and cfg.schedule.warmup_epochs == 40
    assert cfg.checkpointing.keep_last_n == 5 and cfg.logging.console_clear_freq == 100
    # its base_lr 2.4e-3 is already the scaled rate: we say so
    assert "looks already scaled" in lr_warnings(cfg)[0]


@pytest.mark.parametrize(
    "name",
    [
        "mae_pretrain_vit_base",
        "mae_pretrain_vit_large",
        "mae_pretrain_vit_base_test",
        "demo",
        "bench_vit_base",
        "bench_vit_large",
        "bench_cpu",
    ],
)
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / f"configs/{name}.yaml")
    assert lr_warnings(cfg) == []


def test_paper_recipe_derived_values():
    cfg = load_config(ROOT / "configs/mae_pretrain_vit_large.yaml")
    d = derive(cfg, num_images=1_281_167)
    assert cfg.schedule.epochs == 1600 and d.effective_batch == 4096
    assert d.lr == pytest.approx(2.4e-3)  # 1.5e-4 * 4096 / 256
    assert d.accum_steps == 32 and d.micro_batch_size == 128
    assert d.steps_per_epoch == 312 and d.total_steps == 312 * 1600 and d.warmup_steps == 312 * 40
    d8 = derive(cfg, num_images=1_281_167, world_size=8)
    assert d8.accum_steps == 4 and d8.micro_batch_size * d8.accum_steps * 8 == 4096


def test_absolute_lr_wins():
    cfg = config_from_dict({"optimization": {"batch_size": 512, "lr": 1e-3}})
    assert derive(cfg, 10_000).lr == 1e-3


@pytest.mark.parametrize(
    "data,key,fragment",
    [
        ({"optimization": {"base_lrr": 1e-4}}, "optimization.base_lrr", "did you mean optimization.base_lr"),
        ({"modle": {}}, "modle", "did you mean model"),
        (
            {"data": {"augmentation": {"crop_scal": [0.2, 1]}}},
            "data.augmentation.crop_scal",
            "did you mean data.augmentation.crop_scale",
        ),
        ({"optimization": {"batch_size": "big"}}, "optimization.batch_size", "expected an integer"),
        ({"optimization": {"batch_size": 4.5}}, "optimization.batch_size", "expected an integer"),
        ({"model": {"norm_pix_loss": "yes"}}, "model.norm_pix_loss", "expected true or false"),
        ({"model": {"mask_ratio": 1.0}}, "model.mask_ratio", "(0, 1)"),
        ({"model": {"mask_ratio": 0}}, "model.mask_ratio", "(0, 1)"),
        ({"model": {"type": "mae_vit_base_patch61"}}, "model.type", "did you mean 'mae_vit_base_patch16'"),
        ({"optimization": {"batch_size": 1000, "micro_batch_size": 64}}, "optimization.batch_size", "not divisible"),
        ({"data": {"input_size": 100}}, "data.input_size", "multiple of the patch size 16"),
        ({"data": {"backend": "ffcv"}}, "data.backend", "dali, pil or synthetic"),
        ({"misc": {"attention": "flash2"}}, "misc.attention", "auto, flash, efficient, cudnn or math"),
        ({"misc": {"precision": "fp16"}}, "misc.precision", "amp or bf16"),
        ({"data": {"augmentation": {"crop_scale": [0.9, 0.2]}}}, "data.augmentation.crop_scale", "low <= high"),
        ({"schedule": {"warmup_epochs": 50, "epochs": 10}}, "schedule.warmup_epochs", "epochs=10"),
        ({"optimization": {"lr": "inf"}}, "optimization.lr", "expected a finite number"),
        ({"misc": {"device": "cuda:x"}}, "misc.device", "cuda:N"),
        ({"misc": {"seed": -1}}, "misc.seed", "[0, 2**32 - 1]"),
        ({"misc": {"seed": 2**32}}, "misc.seed", "[0, 2**32 - 1]"),
        ({"misc": {"seed": "1e23"}}, "misc.seed", "expected an integer"),
        ({"data": {"num_workers": 100000}}, "data.num_workers", "CPU cores"),
        ({"data": {"prefetch": 100000}}, "data.prefetch", "[1, 32]"),
    ],
)
def test_config_errors_name_the_key(data, key, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(key + ":")
    assert fragment in str(e.value)


def test_batch_not_divisible_by_world_size():
    cfg = config_from_dict({"optimization": {"batch_size": 4096, "micro_batch_size": 256}})
    with pytest.raises(ConfigError, match="optimization.batch_size: 4096 is not divisible by the world size 3"):
        derive(cfg, 1_000_000, world_size=3)


def test_min_lr_above_the_peak_and_steps_per_epoch_beyond_the_data():
    with pytest.raises(ConfigError, match="optimization.min_lr: 0.01 is above the peak lr 0.0001"):
        derive(config_from_dict({"optimization": {"batch_size": 256, "lr": 1e-4, "min_lr": 1e-2}}), 10_000)
    # steps_per_epoch caps a real data set; only synthetic data may set any epoch length
    capped = config_from_dict({"optimization": {"batch_size": 32}, "schedule": {"steps_per_epoch": 2}})
    assert derive(capped, 1000).steps_per_epoch == 2
    with pytest.raises(ConfigError, match="larger than the data set .16 images in data.data_path"):
        derive(capped, 16)
    synthetic = config_from_dict(
        {"optimization": {"batch_size": 32}, "schedule": {"steps_per_epoch": 5}, "data": {"backend": "synthetic"}}
    )
    assert derive(synthetic, 16).steps_per_epoch == 5


def test_override_into_an_empty_section(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\noptimization:\n  batch_size: 64\n")
    assert load_config(tmp_path / "c.yaml", ["model.type=mae_vit_large_patch16"]).model.type == "mae_vit_large_patch16"


def test_batch_larger_than_data_set():
    cfg = config_from_dict({"optimization": {"batch_size": 64}})
    with pytest.raises(ConfigError, match="larger than the data set"):
        derive(cfg, 10)


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimization": {"base_lr": 1.5e-4}}))
    cfg = load_config(
        path,
        [
            "optimization.base_lr=1e-4",
            "model.norm_pix_loss=false",
            "optimization.lr=null",
            "data.augmentation.crop_scale=[0.3, 1.0]",
        ],
    )
    assert cfg.optimization.base_lr == 1e-4 and cfg.model.norm_pix_loss is False
    assert cfg.data.augmentation.crop_scale == [0.3, 1.0]
    with pytest.raises(ConfigError, match="optimization.base_lrr: unknown key"):
        load_config(path, ["optimization.base_lrr=1e-4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optimization.base_lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/mae_pretrain_vit_base.yaml")
    d = derive(cfg, 1_281_167)
    save_config(cfg, d, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["derived"]["lr"] == pytest.approx(2.4e-3) and saved["derived"]["accum_steps"] == 16
    assert config_from_dict(saved) == cfg  # a run's saved config loads back (derived values are recomputed)
    assert load_config(tmp_path / "config.yaml") == cfg
