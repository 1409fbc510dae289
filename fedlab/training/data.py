"""The datasets a training plan receives: a pandas DataFrame for CSV, ``ImageFolderData`` for images.

An image dataset is a folder with one sub-folder of images per class, the layout a node
checks when the dataset is registered (``fedlab node dataset add --type images``). Images
are read lazily, one at a time (``load``) or all at once (``arrays``), so a plan decides
whether a dataset fits in memory. Pixels come back as ``uint8`` arrays of shape
``(height, width, channels)``, grayscale images included (one channel), so plans never
special-case the mode an image happened to be saved in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fedlab.errors import FedlabDatasetError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "load_dataset"]

# The same extensions the node accepts when it registers an image folder.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"})
# PIL modes whose bands are 8-bit; other 8-bit modes are converted to RGB, the rest refused.
_UINT8_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
_CONVERTIBLE = {"1": "L", "P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


class ImageFolderData:
    """The images of a class-per-sub-folder dataset, their class names and labels.

    ``classes`` are the sub-folder names in sorted order and ``labels[i]`` is the index
    in ``classes`` of ``files[i]``; hidden entries and files without an image extension are
    ignored, as they are at registration.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FedlabDatasetError(
                f"image folder {self.root} does not exist or is not a directory; "
                "it needs one sub-folder of images per class"
            )
        try:
            self.classes: list[str] = sorted(
                d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
            )
            files: list[Path] = []
            labels: list[int] = []
            for label, name in enumerate(self.classes):
                found = sorted(
                    f
                    for f in (self.root / name).iterdir()
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
                )
                files.extend(found)
                labels.extend([label] * len(found))
        except OSError as exc:
            raise FedlabDatasetError(f"cannot read image folder {self.root}: {exc.strerror or exc}") from exc
        if not files:
            raise FedlabDatasetError(
                f"image folder {self.root} holds no images in class sub-folders; "
                f"put images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in one sub-folder per class"
            )
        self.files: list[Path] = files
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolderData({str(self.root)!r}, {len(self)} images, classes={self.classes})"

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a writable ``uint8`` array of shape ``(height, width, channels)``."""
        from PIL import Image

        file = self.files[i]
        try:
            with Image.open(file) as opened:
                img: Image.Image = opened
                if img.mode not in _UINT8_MODES:
                    target = _CONVERTIBLE.get(img.mode)
                    if target is None:
                        raise FedlabDatasetError(
                            f"image {file} has mode {img.mode}, which is not 8 bits per channel; "
                            "convert the images to 8-bit grayscale or RGB"
                        )
                    img = img.convert(target)
                pixels = np.array(img, dtype=np.uint8)
        except FedlabDatasetError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            raise FedlabDatasetError(f"cannot read image {file}: {exc}; remove or replace it") from exc
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images stacked, ``uint8 (N, H, W, C)``, and their ``int64`` labels."""
        first = self.load(0)
        images = np.empty((len(self.files), *first.shape), dtype=np.uint8)
        images[0] = first
        for i in range(1, len(self.files)):
            pixels = self.load(i)
            if pixels.shape != first.shape:
                raise FedlabDatasetError(
                    f"image {self.files[i]} has shape {pixels.shape} but {self.files[0]} has {first.shape}; "
                    "all images of a dataset must share one height, width and number of channels"
                )
            images[i] = pixels
        return images, self.labels.copy()


def load_dataset(data_type: str, path: str | os.PathLike[str]) -> Any:
    """The dataset at ``path`` as a plan receives it: a DataFrame (``"csv"``) or ``ImageFolderData`` (``"images"``)."""
    if data_type == "images":
        return ImageFolderData(path)
    if data_type != "csv":
        raise FedlabDatasetError(
            f"cannot train on datasets of type {data_type!r}; training supports 'csv' and 'images'"
        )
    import pandas as pd

    p = Path(path).expanduser()
    try:
        return pd.read_csv(p, low_memory=False)
    except FileNotFoundError as exc:
        raise FedlabDatasetError(f"CSV file {p} does not exist any more; re-register the dataset") from exc
    except UnicodeDecodeError as exc:
        raise FedlabDatasetError(f"CSV file {p} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise FedlabDatasetError(f"CSV file {p} cannot be parsed: {str(exc).strip() or type(exc).__name__}") from exc
    except OSError as exc:
        raise FedlabDatasetError(f"cannot read CSV file {p}: {exc.strerror or exc}") from exc
