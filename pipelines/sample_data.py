"""A small ImageNet-like folder cut from the colour photographs shipped with scikit-image.

Each image i is a function of (seed, i) only: a random crop of one photograph,
rescaled to about 500x375, maybe mirrored, with a little colour jitter, saved
as a JPEG in out_dir/class_<k>/img_<i>.JPEG. Real photographs (not noise) make
pixel statistics, crops and the MAE loss behave as on real data.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageEnhance

# Colour photographs that skimage.data loads from files inside the package (no download);
# together their pixel statistics are close to ImageNet's (the Hubble field is too dark).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "stereo_motorcycle")

# the labelled set configs/demo.yaml evaluates on (written on first use: evaluate.sample_labelled_if_missing)
DEMO_LABELLED = {"n_train": 480, "n_val": 240, "regions": 2}


def make_sample_data(out_dir: str, n: int = 256, num_classes: int = 4, seed: int = 0) -> str:
    """Write n JPEGs (about 500x375) into out_dir/class_<k>/; return out_dir.

    Idempotent: files that already exist are kept, so a second call with the
    same arguments returns at once. Writes are atomic (temp file + rename). One thread
    per core: PIL releases the GIL while it resizes and encodes.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(f"need n >= 1 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    paths = [os.path.join(out_dir, f"class_{i % num_classes}", f"img_{i:06d}.JPEG") for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    if not missing:
        return out_dir
    photos = _load_photos()
    for k in range(min(n, num_classes)):
        os.makedirs(os.path.join(out_dir, f"class_{k}"), exist_ok=True)

    def write(i: int) -> None:
        _save_jpeg(_sample_image(photos, np.random.default_rng((seed, i))), paths[i])  # ~65 KB at 500x375

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, missing))  # list(): re-raises the first error
    return out_dir


def make_labelled_sample(out_dir: str, n_train: int = 480, n_val: int = 240, seed: int = 0, regions: int = 1) -> str:
    """Write a labelled pair out_dir/train/<class>/ and out_dir/val/<class>/ of JPEGs; return out_dir.

    regions 1: the class of an image is the photograph its crop comes from (about 500x375, most of the photo;
    a random encoder already tells the 6 apart at ~92% kNN). regions R > 1: each photograph is cut into an
    R x R grid and each cell is a class (<photo>_<row><col>, 6 R^2 classes); an image is a crop of 0.4-0.8 of
    its cell's sides, 200 px wide, with stronger colour jitter: a harder set (the demo's, R = 2: ~50% kNN),
    on which learned features can show a trend. Image i of a split has class i % classes (balanced).
    Train and val images are drawn from separate random streams (seed, split, i), so no val image is a
    train image. Idempotent and atomic, as make_sample_data.
    """
    if n_train < 1 or n_val < 1 or regions < 1:
        raise ValueError(f"need n_train, n_val, regions >= 1, got n_train={n_train}, n_val={n_val}, regions={regions}")
    photos = _load_photos()
    # class names: the photographs' names, unless one failed to load (then which one is not known)
    names = list(_PHOTOS) if len(photos) == len(_PHOTOS) else [f"photo_{k}" for k in range(len(photos))]
    cells = [(p, r, c) for p in range(len(photos)) for r in range(regions) for c in range(regions)]
    if regions > 1:
        names = [f"{names[p]}_{r}{c}" for p, r, c in cells]
    jobs = []  # (path, class index, rng key)
    for code, (split, n) in enumerate((("train", n_train), ("val", n_val)), start=1):
        for i in range(n):
            k = i % len(names)
            path = os.path.join(out_dir, split, names[k], f"img_{i:06d}.JPEG")
            if not os.path.exists(path):
                jobs.append((path, k, (seed, code, i)))
    for path in {os.path.dirname(p) for p, _, _ in jobs}:
        os.makedirs(path, exist_ok=True)

    def write(job: tuple[str, int, tuple[int, int, int]]) -> None:
        path, k, key = job
        rng = np.random.default_rng(key)
        if regions == 1:
            img = _sample_image([photos[k]], rng)
        else:
            p, r, c = cells[k]
            img = _region_image(photos[p], r, c, regions, rng)
        _save_jpeg(img, path)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, jobs))
    return out_dir


def _load_photos() -> list[Image.Image]:
    import skimage.data

    photos = []
    for name in _PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
            if name == "stereo_motorcycle":
                arr = arr[0]  # (left, right, disparity): the left view
        except Exception:  # a photo that would need a download, or is missing in this version
            continue
        photos.append(Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    if not photos:
        raise RuntimeError("no colour photograph could be loaded from skimage.data")
    return photos


def _region_image(photo: Image.Image, row: int, col: int, regions: int, rng: np.random.Generator) -> Image.Image:
    """A crop of 0.4-0.8 of the sides of cell (row, col) of a regions x regions grid over the photo, at a
    random place inside the cell, 200 px wide, maybe mirrored, with colour jitter of +-30%."""
    cw, ch = photo.width / regions, photo.height / regions
    s = rng.uniform(0.4, 0.8)
    w, h = cw * s, ch * s
    x, y = col * cw + rng.uniform(0, cw - w), row * ch + rng.uniform(0, ch - h)
    img = photo.crop((round(x), round(y), round(x + w), round(y + h)))
    img = img.resize((200, max(1, round(200 * h / w))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    return img


def _sample_image(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    src = photos[rng.integers(len(photos))]
    W = int(rng.integers(440, 561))  # output size around 500x375, landscape or portrait
    H = int(W * rng.uniform(0.7, 0.8))
    if rng.random() < 0.25:
        W, H = H, W
    # Scale the photo so it covers the output, times a zoom in [1, 1.6]; then crop at random.
    zoom = rng.uniform(1.0, 1.6)
    scale = max(W / src.width, H / src.height) * zoom
    sw, sh = max(W, round(src.width * scale)), max(H, round(src.height * scale))
    img = src.resize((sw, sh), Image.BICUBIC)
    x, y = int(rng.integers(0, sw - W + 1)), int(rng.integers(0, sh - H + 1))
    img = img.crop((x, y, x + W, y + H))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.75, 1.25))
    return img


def _save_jpeg(img: Image.Image, path: str) -> None:
    """`img` as a JPEG at `path`, through a new temporary file beside it (O_EXCL: a link planted there is never
    written through), renamed over `path` when whole."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="JPEG", quality=95)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
