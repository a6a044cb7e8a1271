"""Data pipelines for MAE pretraining: DALI (fast), PIL (reference), synthetic; dataset scan.

Never imports mae_fast, so the pipelines can be benchmarked alone. DALI and
torchvision are imported only when a loader of that kind is built.
"""

from .common import AugmentConfig, epoch_order
from .dali import DaliLoader, build_dali_loader, dali_available
from .pil import PilLoader, build_pil_loader
from .sample_data import make_sample_data
from .scan import IMAGE_EXTS, DatasetScanError, ScanResult, format_bad, scan_dataset
from .synthetic import SyntheticLoader

__all__ = [
    "IMAGE_EXTS",
    "AugmentConfig",
    "DaliLoader",
    "DatasetScanError",
    "PilLoader",
    "ScanResult",
    "SyntheticLoader",
    "build_dali_loader",
    "build_pil_loader",
    "dali_available",
    "epoch_order",
    "format_bad",
    "make_sample_data",
    "scan_dataset",
]
