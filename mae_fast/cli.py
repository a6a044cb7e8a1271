"""`mae-fast` command line: one parser and one function per command (train, bench*, scan, make-shards,
make-sample-data, visualize, export, eval); errors meant for the user print one `error:` line and exit 1 or 2."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, load_config

# Exit codes: 0 done; 1 error in the run (a checkpoint that cannot be read or written included);
# 2 bad config, data path, arguments, or a run folder in use; 3 training diverged (non-finite loss);
# 4 stopped by SIGTERM/SIGINT after saving a checkpoint (the message says how to continue);
# 130 interrupted again (a second Ctrl-C) before the checkpoint was written: nothing saved.
EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def bounded(kind: type = int, lo: float | None = None, hi: float | None = None) -> Callable[[str], int | float]:
    """An argparse `type=`: the text as a `kind` (int or float; a float must be finite) in [lo, hi]. Anything else
    is argparse's one error line naming the option and the bounds, exit 2 (EXIT_USAGE), as the config's values are."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            (kind is float and not math.isfinite(value))
            or (lo is not None and value < lo)
            or (hi is not None and value > hi)
        ):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's messages name the type
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse ending a bad command line as every other bad input ends: one `error:` line (after the usage), exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}\n")


COUNT = bounded(int, 1, 10**6)  # steps, batches, images: at least one
WORKERS = bounded(int, 1, 1024)  # threads or processes


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML (or JSON) config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimization.base_lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mae-fast", description="Fast MAE pretraining with DALI and torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _data_commands(sub)
    _model_commands(sub)
    return parser


def _training_commands(sub) -> None:
    """train and the benchmark harness"""
    p = sub.add_parser("train", help="pretrain an MAE as the config says")
    _add_config(p)
    p.add_argument(
        "--max-steps", type=bounded(int, 1, 10**12), default=None, help="stop after this many optimizer steps (> 0)"
    )
    p.set_defaults(run=_train)

    p = sub.add_parser("bench-step", help="time the training step on synthetic data")
    _add_config(p)
    p.add_argument("--steps", type=COUNT, default=20)
    p.add_argument("--warmup", type=bounded(int, 0, 10**6), default=5)
    p.add_argument("--batch", type=COUNT, default=None, help="micro-batch (default: the config's)")
    p.add_argument("--compare", action="store_true", help="also time the official reference step")
    p.add_argument("--profile", default=None, metavar="PATH", help="write the profiler's kernel table of the step here")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also time the step with these overrides, in the same run, as a ratio to the config's "
        "(repeatable), e.g. --variant misc.attention=cudnn --variant model.embed_kept_only=true",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(run=_bench_step)

    p = sub.add_parser("bench", help="the whole harness: loaders, step and end to end, each with its baseline")
    _add_config(p)
    p.add_argument("--steps", type=COUNT, default=30)
    p.add_argument("--batches", type=COUNT, default=40)
    p.add_argument("--out-dir", default="benchmarks/results", help="JSON results go here ('' for none)")
    p.set_defaults(run=_bench)

    p = sub.add_parser("bench-loader", help="time the data loaders (DALI and/or PIL) on the config's data")
    _add_config(p)
    p.add_argument("--backend", choices=["dali", "pil", "both"], default="both")
    p.add_argument("--shards", default=None, metavar="DIR", help="also time DALI over these shards of the same images")
    p.add_argument("--folder", default=None, metavar="DIR", help="(data_path shards) also time the image folder")
    p.add_argument("--store", default=None, metavar="URL", help="(data_path shards) also time their copy in a store")
    p.add_argument("--batches", type=COUNT, default=50)
    p.add_argument("--warmup", type=bounded(int, 0, 10**6), default=5)
    p.add_argument("--json", default=None)
    p.set_defaults(run=_bench_loader)


def _data_commands(sub) -> None:
    """data folders and shards"""
    p = sub.add_parser("scan", help="list and check the images of a data folder (cached)")
    p.add_argument("data_path")
    p.add_argument("--workers", type=WORKERS, default=8)
    p.add_argument("--cache-dir", default=None, help="cache the file list (shards: the indexes index-shards wrote)")
    p.add_argument("--shards", default="*.tar", metavar="GLOB", help="shards: the tars to read (data.shards)")
    p.set_defaults(run=_scan)

    p = sub.add_parser("index-shards", help="write the DALI index of each WebDataset tar written by another tool")
    p.add_argument("path", help="a folder of *.tar, or s3://, gs://, http(s):// prefix holding them")
    p.add_argument("--shards", default="*.tar", metavar="GLOB", help="the tars to index (data.shards)")
    p.add_argument("--cache-dir", default="", help="where indexes go when PATH cannot be written (~/.cache/mae-fast)")
    p.add_argument("--workers", type=WORKERS, default=8)
    p.set_defaults(run=_index_shards)

    p = sub.add_parser("make-shards", help="convert an image folder into WebDataset tar shards with DALI indexes")
    p.add_argument("src", help="ImageNet-style (SRC/<class>/*.JPEG) or flat image folder")
    p.add_argument("dst", help="folder for shard-000000.tar ..., an .idx beside each, and manifest.json")
    p.add_argument(
        "--shard-size-mb", type=bounded(float, 1e-3, 2**20), default=512, help="tar size per shard, at most (MiB)"
    )
    p.add_argument("--workers", type=WORKERS, default=8, help="threads that check and write")
    p.add_argument("--cache-dir", default=None, help="the scan's cache (default: in SRC)")
    p.set_defaults(run=_make_shards)

    p = sub.add_parser("make-sample-data", help="write a small ImageNet-like JPEG folder from real photos")
    p.add_argument("out_dir")
    p.add_argument("--n", type=COUNT, default=256, help="images to write")

    p.set_defaults(run=_make_sample_data)


def _model_commands(sub) -> None:
    """what a checkpoint holds: reconstructions, exports, evaluation"""
    p = sub.add_parser("visualize", help="reconstruction grid (original | masked | reconstruction | pasted) as PNG")
    p.add_argument("checkpoint", help="a mae-fast checkpoint (model.pt, latest.pt, final.pt) or an official MAE one")
    p.add_argument("--images", nargs="+", required=True, help="image files, one row each")
    p.add_argument("--out", default="recon.png")
    p.add_argument("--mask-ratio", type=bounded(float, 0, 1), default=0.75)
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seed of the random mask")
    p.add_argument(
        "--norm-pix",
        choices=["auto", "on", "off"],
        default="auto",
        help="was the model trained with norm_pix_loss? auto: from a mae-fast checkpoint's config, else off",
    )
    p.set_defaults(run=_visualize)

    p = sub.add_parser("export", help="export the encoder: timm safetensors, TorchScript or torch.export")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["timm", "torchscript", "exported"], default="timm")
    p.add_argument("--out", required=True, help="e.g. encoder.safetensors, encoder.ts.pt, encoder.pt2")
    p.set_defaults(run=_export)

    p = sub.add_parser("eval", help="kNN (and linear-probe) accuracy of a checkpoint's frozen encoder")
    p.add_argument("checkpoint", help="a mae-fast checkpoint, an official MAE one, or a timm export (.safetensors)")
    p.add_argument("--train", required=True, metavar="DIR", help="labelled images, DIR/<class>/*.JPEG: the kNN bank")
    p.add_argument("--val", required=True, metavar="DIR", help="labelled images; its classes must be in --train's")
    p.add_argument("--k", type=bounded(int, 1, 10**6), default=20, help="neighbours that vote (exp(similarity / 0.07))")
    p.add_argument("--linear", action="store_true", help="also train a linear probe on the cached features")
    p.add_argument(
        "--max-train", type=bounded(int, 0, 2**40), default=0, metavar="N", help="N random train images (0: all)"
    )
    p.add_argument("--batch-size", "--batch", dest="batch", type=bounded(int, 1, 4096), default=128, help="per forward")
    p.add_argument(
        "--num-threads", "--workers", dest="workers", type=bounded(int, 1, 256), default=4, help="DALI threads"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="of the train subsample and the probe")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results, checkpoint step and versions here")
    p.set_defaults(run=_eval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError, RunFolderError
    from .metrics import NonFiniteLoss
    from .pipelines.store import StoreError
    from .pipelines.validate import DatasetScanError, DestinationError, WriteError

    codes = {
        ConfigError: EXIT_USAGE,
        DatasetScanError: EXIT_USAGE,
        DestinationError: EXIT_USAGE,
        WriteError: EXIT_ERROR,
        StoreError: EXIT_ERROR,  # a store that failed for good while writing (reading one is a DatasetScanError)
        NonFiniteLoss: EXIT_DIVERGED,
        CheckpointError: EXIT_ERROR,
        RunFolderError: EXIT_USAGE,
    }
    try:
        return args.run(args)
    except tuple(codes) as e:  # errors with a message for the user: no traceback
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(e, kind))
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was being written, or any Ctrl-C
        print("interrupted: stopped at once, without saving (the newest checkpoint is latest.pt)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    from .preempt import StoppedAtStartup, guard_startup, release_startup

    guard_startup()  # before the trainer's imports: a preempted start-up is exit 4, not the signal's default
    try:
        from .train import train

        result = train(load_config(args.config, args.overrides), max_steps=args.max_steps)
    except StoppedAtStartup as e:
        print(e, file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        release_startup()
    if not result.preempted:
        return 0
    if result.last_checkpoint:  # rank 0: the exact command that continues from the checkpoint just written
        kept = [o for o in args.overrides if not o.startswith(("misc.resume=", "misc.auto_resume="))]
        again = ["mae-fast", "train", args.config, *(a for o in kept for a in ("--set", o))]
        again += ["--set", f"misc.resume={result.last_checkpoint}"]
        print(f"stopped at step {result.steps_done}, saved; continue with:\n  {shlex.join(again)}", file=sys.stderr)
    return EXIT_PREEMPTED


def _bench_step(args: argparse.Namespace) -> int:
    from .bench import bench_step, write_json
    from .config import config_from_dict

    cfg = load_config(args.config, args.overrides)
    _check_outputs(json=args.json, profile=args.profile)
    # overrides split at commas outside brackets: data.augmentation.crop_scale=[0.3,1.0] stays whole
    variants = [
        (v, config_from_dict(cfg.to_dict(), [o.strip() for o in re.split(r",(?![^\[]*\])", v)])) for v in args.variant
    ]
    write_json(
        bench_step(
            cfg,
            steps=args.steps,
            warmup=args.warmup,
            compare=args.compare,
            batch=args.batch,
            profile=args.profile,
            variants=variants,
        ),
        args.json,
    )
    return 0


def _check_outputs(**paths: str | None) -> None:
    """The files a command will write (--json, --profile), checked before the work (DestinationError, exit 2)."""
    from .pipelines.validate import check_file

    for option, path in paths.items():
        if path:
            check_file(path, f"--{option}")


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_all
    from .pipelines.validate import check_folder

    if args.out_dir:
        check_folder(args.out_dir, "--out-dir")
    bench_all(
        load_config(args.config, args.overrides),
        steps=args.steps,
        batches=args.batches,
        out_dir=args.out_dir or None,
    )
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    from .bench import bench_loader, write_json

    _check_outputs(json=args.json)
    write_json(
        bench_loader(
            load_config(args.config, args.overrides),
            backend=args.backend,
            batches=args.batches,
            warmup=args.warmup,
            shards=args.shards,
            folder=args.folder,
            store=args.store,
        ),
        args.json,
    )
    return 0


def _scan(args: argparse.Namespace) -> int:
    from .pipelines.scan import DatasetScanError, format_bad, scan_dataset
    from .pipelines.shards import format_problems, is_shard_path, scan_shards

    if is_shard_path(args.data_path):  # a folder of shards: counted from the indexes, each tar checked
        found = scan_shards(args.data_path, args.workers, pattern=args.shards, cache_dir=args.cache_dir or "")
        classes = f" in {len(found.classes)} classes" if found.classes else ""
        print(f"{found.samples} samples{classes} in {len(found.tars)} shards under {args.data_path}")
        seen = sorted({c for v in found.labelled.values() for c in v})
        if seen:
            order = (
                "class-sorted (a shard holds one or two classes): the loader's lanes mix them (README: Mixing)"
                if found.class_sorted()
                else "classes mixed within shards"
            )
            print(f"labels (.cls of 8 samples a shard): {len(seen)} classes seen; {order}")
        if found.bad:
            print(f"{len(found.bad)} source files were left out by make-shards (listed in its manifest.json)")
        if found.problems:
            raise DatasetScanError(f"{found.root}: " + format_problems(found.problems, len(found.tars)))
    else:
        result = scan_dataset(args.data_path, cache_dir=args.cache_dir, num_workers=args.workers)
        for note in result.notes:  # a scan cache that was rebuilt or not written
            print(f"warning: {note}", file=sys.stderr)
        print(f"{len(result.files)} images in {len(result.classes) or 1} classes under {args.data_path}")
        if result.bad:
            print(format_bad(result))
    return 0


def _index_shards(args: argparse.Namespace) -> int:
    from .pipelines.index_shards import index_shards
    from .pipelines.scan import DatasetScanError
    from .pipelines.shards import format_problems

    r = index_shards(args.path, args.shards, args.cache_dir, args.workers)
    print(f"{r.written} indexes written into {r.written_to}; {r.scan.samples} samples in {len(r.scan.tars)} shards")
    if r.skipped:
        shown = ", ".join(f"{name} ({why})" for name, why in r.skipped[:5])
        print(f"{len(r.skipped)} samples left out of the indexes: {shown}")
    problems = r.failed + [p for p in r.scan.problems if p[0] not in dict(r.failed)]
    if problems:
        raise DatasetScanError(f"{r.scan.root}: " + format_problems(problems, len(r.scan.tars)))
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from .pipelines.make_shards import make_shards

    report = make_shards(
        args.src,
        args.dst,
        shard_bytes=int(args.shard_size_mb * 2**20),
        workers=args.workers,
        cache_dir=args.cache_dir,
    )
    kept = f", {report.shards - report.written} of them already complete" if report.written < report.shards else ""
    print(f"{report.samples} samples in {report.shards} shards ({report.bytes / 2**20:,.1f} MiB) in {report.dst}{kept}")
    if report.bad:
        shown = ", ".join(f"{path} ({why})" for path, why in report.bad[:5])
        more = f", and {len(report.bad) - 5} more" if len(report.bad) > 5 else ""
        print(f"{len(report.bad)} files left out by the scan (listed in manifest.json): {shown}{more}")
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from .pipelines.validate import WriteError, check_file
    from .visualize import visualize_files
    from .weights import load_mae

    if not 0 < args.mask_ratio < 1:
        raise ConfigError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    check_file(args.out, "--out")
    loaded = load_mae(args.checkpoint, None if args.norm_pix == "auto" else args.norm_pix == "on")
    print("\n".join(loaded.notes))
    try:
        out = visualize_files(loaded.model, args.images, args.out, args.mask_ratio, args.seed)
    except ValueError as e:
        raise ConfigError(f"--images: {e}") from None
    except OSError as e:  # a full disk under --out
        raise WriteError(f"{e.filename or args.out}: not written ({e.strerror or e})") from None
    print(f"wrote {out} ({len(args.images)} rows: original | masked | reconstruction | reconstruction + visible)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import ensure_finite, export_program, export_timm, export_torchscript
    from .pipelines.validate import check_file
    from .weights import load_mae

    check_file(args.out, "--out")  # before the model is loaded: a path that cannot be written is known at once
    loaded = load_mae(args.checkpoint)
    print("\n".join(loaded.notes))
    ensure_finite(loaded.model, args.checkpoint)
    if args.format == "timm":
        how = export_timm(loaded.model, loaded.model_type, args.out)
        print(f"wrote {args.out}; load it with\n  import timm\n  model = {how}")
    elif args.format == "torchscript":
        export_torchscript(loaded.model, args.out)
        print(f"wrote {args.out}: torch.jit.load(path)(images (N,3,H,W)) -> features (N, D); checked against eager")
    else:
        export_program(loaded.model, args.out)
        print(f"wrote {args.out}: torch.export.load(path).module()(images) -> features (N, D); checked against eager")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """`mae-fast eval`: every argument and the --json destination checked, the folders scanned, then the
    checkpoint loaded and evaluated; the numbers printed (and written to --json with the step and versions)."""
    from .pipelines.validate import WriteError, check_file

    _check_eval_args(args)
    if args.json:
        check_file(args.json, "--json")
    import torch

    from .evaluate import EvalOptions, Evaluator, scan_labelled
    from .observe import versions
    from .runtime import resolve_device
    from .weights import load_encoder

    device = resolve_device(args.device, key="--device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device: {args.device!r}, but there are {torch.cuda.device_count()} CUDA devices")
    sets = scan_labelled(args.train, args.val, max_train=args.max_train, seed=args.seed, names=("--train", "--val"))
    loaded = load_encoder(args.checkpoint)
    mean, std = loaded.normalization
    options = EvalOptions(
        k=args.k,
        linear=args.linear,
        mean=mean,
        std=std,
        batch_size=args.batch,
        num_threads=args.workers,
        seed=args.seed,
    )
    evaluator = Evaluator(sets, options, device)
    print("\n".join(loaded.notes + sets.notes))
    result = evaluator(loaded.model.to(device), loaded.step)
    print(_format_eval(result))
    if args.json:
        record = {
            "checkpoint": str(args.checkpoint),
            "source": loaded.source,
            "model_type": loaded.model_type,
            "input_size": loaded.model.arch.img_size,
            "train": str(args.train),
            "val": str(args.val),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            **{k: v for k, v in result.to_dict().items() if k != "epoch"},
            "versions": versions(),
        }
        try:  # checked before the work; a disk that filled up since is still one line
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        except OSError as e:
            raise WriteError(f"--json {args.json}: not written ({e.strerror or e})") from None
        print(f"wrote {args.json}")
    return 0


def _check_eval_args(args: argparse.Namespace) -> None:
    """What the parser's bounds cannot say, before any work (exit 2): the probe's train set, a device that exists."""
    if args.linear and args.max_train == 1:
        raise ConfigError("--max-train 1 --linear: the linear probe needs at least 2 train images")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")


def _format_eval(r) -> str:
    """What `mae-fast eval` prints of an EvalResult."""
    from .probes import KNN_TEMPERATURE

    lines = [f"kNN (k={r.k}, T={KNN_TEMPERATURE}): top-1 {r.knn_top1:.2f}%  top-5 {r.knn_top5:.2f}%"]
    if r.linear_top1 is not None:
        lines.append(f"linear probe: top-1 {r.linear_top1:.2f}%  top-5 {r.linear_top5:.2f}%")
    rate = (r.num_train + r.num_val) / max(r.extract_s, 1e-9)
    lines.append(
        f"{r.num_train} train / {r.num_val} val images, {r.num_classes} classes, "
        f"{r.feature_dim}-d features; {r.seconds:.1f}s ({r.extract_s:.1f}s extracting, {rate:.0f} img/s)"
    )
    if r.skipped:
        lines.append(f"left out {len(r.skipped)} file(s) that cannot be decoded: {', '.join(r.skipped)}")
    return "\n".join(lines)


def _make_sample_data(args: argparse.Namespace) -> int:
    from .pipelines.sample_data import make_sample_data
    from .pipelines.validate import WriteError, check_folder

    out = check_folder(args.out_dir, "make-sample-data DIR")
    try:
        print(f"sample data in {make_sample_data(out, n=args.n)}")
    except OSError as e:  # a full disk part-way: the files written are kept, a rerun writes the rest
        raise WriteError(f"{e.filename or out}: not written ({e.strerror or e}); run it again to finish") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
