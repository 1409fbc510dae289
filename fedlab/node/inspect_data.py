"""Check a dataset on disk and describe it, before a node agrees to register it.

A dataset is registered only if it can be read the way a node will later read it, so a bad
file is refused at ``fedlab node dataset add`` time with a message that says what is wrong,
not discovered halfway through a researcher's request. What these functions return (row
count, columns and dtypes, or classes and image shape) is the metadata a node shares about
the dataset; it never contains the data itself.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

from fedlab.errors import FedlabDatasetError

__all__ = ["IMAGE_EXTENSIONS", "inspect_csv", "inspect_images"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"})
_MAX_SHAPES_SHOWN = 5


def _existing(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FedlabDatasetError(f"{what} {p} does not exist; check the --path argument")
    return p


def _header(path: Path) -> list[str]:
    """The header row as written in the file (pandas renames duplicate names, so read it ourselves)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return next(csv.reader(fh), [])


def inspect_csv(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the CSV file at ``path`` and return n_samples, columns, dtypes and shape."""
    import pandas as pd  # lazily: `fedlab node dataset list` should not pay for importing pandas

    p = _existing(path, "CSV file")
    if p.is_dir():
        raise FedlabDatasetError(f"{p} is a directory, not a CSV file; for image folders use --type images")
    try:
        if p.stat().st_size == 0:
            raise FedlabDatasetError(
                f"CSV file {p} is empty; it needs a header row and at least one data row"
            )
        frame = pd.read_csv(p, low_memory=False)
        header = _header(p)
    except FedlabDatasetError:
        raise
    except UnicodeDecodeError as exc:
        raise FedlabDatasetError(
            f"CSV file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8 CSV and try again"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise FedlabDatasetError(
            f"CSV file {p} has no columns; it needs a header row and at least one data row"
        ) from exc
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedlabDatasetError(
            f"CSV file {p} cannot be parsed ({first_line}); check that it is a comma-separated file "
            "with the same number of fields on every line"
        ) from exc
    except OSError as exc:
        raise FedlabDatasetError(f"cannot read CSV file {p}: {exc.strerror or exc}") from exc

    duplicates = sorted({name for name, count in Counter(header).items() if count > 1})
    if duplicates:
        raise FedlabDatasetError(
            f"CSV file {p} has duplicate column name(s) {', '.join(map(repr, duplicates))}; "
            "every column needs a unique name"
        )
    if len(frame) == 0:
        raise FedlabDatasetError(f"CSV file {p} has a header but no data rows; add at least one row")
    columns = [str(c) for c in frame.columns]
    return {
        "n_samples": len(frame),
        "columns": columns,
        "dtypes": {str(c): str(t) for c, t in frame.dtypes.items()},
        "shape": [len(frame), len(columns)],
    }


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_header(file: Path, root: Path) -> tuple[int, int, str, int]:
    """(height, width, mode, channels) of one image, reading only its header."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            width, height = img.size
            return height, width, img.mode, len(img.getbands())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FedlabDatasetError(
            f"{file.relative_to(root)} in {root} is not a readable image ({exc}); remove or replace it"
        ) from exc


def inspect_images(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Scan a folder with one sub-folder of images per class; return classes and image shape.

    Every image must have the same height, width and mode. Hidden entries and files without an
    image extension are ignored; sub-folders inside a class folder are not searched.
    """
    root = _existing(path, "image folder")
    if not root.is_dir():
        raise FedlabDatasetError(
            f"{root} is not a directory; --type images needs a folder with one sub-folder per class"
        )
    try:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files_by_class = {name: _image_files(root / name) for name in classes}
    except OSError as exc:
        raise FedlabDatasetError(f"cannot read image folder {root}: {exc.strerror or exc}") from exc
    if not classes:
        raise FedlabDatasetError(
            f"image folder {root} has no class sub-folders; put the images of each class in their own "
            f"sub-folder (for example {root / 'cat' / '1.png'}, {root / 'dog' / '2.png'})"
        )
    empty = [name for name, files in files_by_class.items() if not files]
    if empty:
        raise FedlabDatasetError(
            f"class folder(s) {', '.join(map(repr, empty))} in {root} hold no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
        )

    examples: dict[tuple[int, int, str, int], Path] = {}
    n_samples = 0
    for files in files_by_class.values():
        for file in files:
            examples.setdefault(_read_header(file, root), file)
            n_samples += 1
    if len(examples) > 1:
        shown = [
            f"{h}x{w} {mode} (e.g. {file.relative_to(root)})"
            for (h, w, mode, _), file in list(examples.items())[:_MAX_SHAPES_SHOWN]
        ]
        more = f" and {len(examples) - _MAX_SHAPES_SHOWN} more" if len(examples) > _MAX_SHAPES_SHOWN else ""
        raise FedlabDatasetError(
            f"images in {root} have {len(examples)} different shapes: {'; '.join(shown)}{more}; "
            "all images must share one shape (height x width and mode): resize or convert them first"
        )
    (height, width, _mode, channels) = next(iter(examples))
    return {
        "n_samples": n_samples,
        "classes": classes,
        "image_shape": [height, width],
        "channels": channels,
        "shape": [n_samples, height, width, channels],
    }
