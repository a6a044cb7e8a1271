"""Data pipelines for MAE pretraining: DALI (fast), PIL (reference), synthetic; dataset scan.

Never imports mae_fast, so the pipelines can be benchmarked alone. The names
below are imported on first use, so `import pipelines.scan` stays light (no
torch, no DALI): the scan's worker processes start quickly.
"""

from importlib import import_module

_EXPORTS = {
    "AugmentConfig": "common",
    "epoch_order": "common",
    "DaliLoader": "dali",
    "build_dali_loader": "dali",
    "dali_available": "dali",
    "PilLoader": "pil",
    "build_pil_loader": "pil",
    "make_sample_data": "sample_data",
    "IMAGE_EXTS": "scan",
    "DatasetScanError": "scan",
    "ScanResult": "scan",
    "format_bad": "scan",
    "scan_dataset": "scan",
    "SyntheticLoader": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
