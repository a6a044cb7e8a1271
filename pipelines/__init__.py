"""Data pipelines for MAE pretraining: DALI (fast), PIL (reference), synthetic; the dataset scan.

Installed as `mae_fast.pipelines` (pyproject.toml maps this top-level folder there). Nothing
here imports the trainer (only sibling modules), so the pipelines can be benchmarked alone, and
`mae_fast.pipelines.scan` stays light (no torch, no DALI): the scan's worker processes start
quickly. Import the module you need: `from mae_fast.pipelines.dali import DaliLoader`.
"""
