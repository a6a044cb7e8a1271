"""The labelled folders of an evaluation: DIR/<class>/* for train and val, val's classes mapped onto train's by
name, the train bank subsampled (seeded); and the demo's labelled sample, written on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .probes import subsample


class EvalDataError(ConfigError):
    """The labelled folders do not fit an evaluation (no classes, or val classes missing from train)."""


@dataclass
class EvalSets:
    """The labelled images of an evaluation; val labels are indices into the train classes."""

    train_files: list[str]
    train_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    classes: list[str]  # the train folder's classes, in label order
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def without(self, paths: set[str]) -> EvalSets:
        """These sets less the files in `paths` (e.g. files found undecodable), the classes as they were."""
        t = [i for i, f in enumerate(self.train_files) if f not in paths]
        v = [i for i, f in enumerate(self.val_files) if f not in paths]
        return EvalSets(
            [self.train_files[i] for i in t],
            [self.train_labels[i] for i in t],
            [self.val_files[i] for i in v],
            [self.val_labels[i] for i in v],
            self.classes,
            self.notes,
        )


def scan_labelled(
    train_path: str,
    val_path: str,
    *,
    max_train: int = 0,
    seed: int = 0,
    cache_dir: str | None = None,
    names: tuple[str, str] = ("evaluation train set", "evaluation val set"),
) -> EvalSets:
    """Scan both folders (cached, as training data), check that val's classes are a subset of train's,
    map val's labels onto train's by class name, subsample the train bank to max_train (uniform, seeded).

    Raises EvalDataError (a ConfigError) for a flat folder or val classes that train lacks, and
    DatasetScanError for a missing or empty folder; the message starts with the folder's name in `names`
    (e.g. the config keys)."""
    from .pipelines.scan import DatasetScanError, scan_dataset

    scans = {}
    for flag, path, name in (("train", train_path, names[0]), ("val", val_path, names[1])):
        try:
            scans[flag] = scan_dataset(path, cache_dir=cache_dir, progress=False)
        except DatasetScanError as e:
            raise DatasetScanError(f"{name}: {e}") from None
        if scans[flag].classes == ["."]:
            raise EvalDataError(f"{name}: {path} has no class subfolders (expected {path}/<class>/*)")
    train, val = scans["train"], scans["val"]
    known = set(train.classes)
    extra = [c for c in val.classes if c not in known]
    if extra:
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        raise EvalDataError(
            f"{names[1]}: the classes of the val set must be a subset of the train set's: {len(extra)} class(es) "
            f"of {val_path} are not in {train_path}: {shown}"
        )
    index = {c: i for i, c in enumerate(train.classes)}
    val_labels = [index[val.classes[label]] for label in val.labels]
    keep = subsample(len(train.files), max_train, seed)
    notes = [f"{len(r.bad)} unreadable file(s) left out of {r.root}" for r in (train, val) if r.bad]
    if len(keep) < len(train.files):
        notes.append(f"train bank: a uniform random {len(keep)} of {len(train.files)} images (seed {seed})")
    return EvalSets(
        [train.files[i] for i in keep],
        [train.labels[i] for i in keep],
        list(val.files),
        val_labels,
        list(train.classes),
        notes,
    )


def sample_labelled_if_missing(train_path: str, val_path: str) -> bool:
    """Write the demo's labelled sample set (sample_data.DEMO_LABELLED) at DIR when train_path and val_path are
    DIR/train and DIR/val and neither exists; True when it wrote it. Any other layout is left to the scan
    (a missing folder is an error there)."""
    train, val = Path(train_path), Path(val_path)
    if train.exists() or val.exists() or (train.name, val.name) != ("train", "val") or train.parent != val.parent:
        return False
    from .pipelines.sample_data import DEMO_LABELLED, make_labelled_sample

    make_labelled_sample(str(train.parent), **DEMO_LABELLED)
    return True
