"""Inspection of CSV files and image folders: the metadata they yield and every refusal."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer

from fedlab.errors import FedlabDatasetError
from fedlab.node.inspect_data import inspect_csv, inspect_images


def make_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Path:
    """An image ``size`` = (width, height) pixels in ``mode``, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def make_image_folder(root: Path, classes: dict[str, int], size=(8, 6), mode="RGB") -> Path:
    for name, count in classes.items():
        for i in range(count):
            make_image(root / name / f"{i}.png", size, mode)
    return root


# --- CSV --------------------------------------------------------------------------------------


def test_csv_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"age": [50, 61, 70], "bmi": [21.5, 30.1, None], "sex": ["f", "m", "f"]}).to_csv(
        path, index=False
    )
    info = inspect_csv(path)
    assert info["n_samples"] == 3
    assert info["columns"] == ["age", "bmi", "sex"]
    assert info["shape"] == [3, 3]
    expected = {c: str(t) for c, t in pd.read_csv(path).dtypes.items()}
    assert info["dtypes"] == expected
    assert info["dtypes"]["age"] == "int64"
    assert info["dtypes"]["bmi"] == "float64"


def test_csv_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"a": [1]}).to_csv(path, index=False)
    assert inspect_csv(str(path))["shape"] == [1, 1]


def test_csv_breast_cancer(tmp_path: Path) -> None:
    frame = load_breast_cancer(as_frame=True).frame
    path = tmp_path / "breast_cancer.csv"
    frame.to_csv(path, index=False)
    info = inspect_csv(path)
    assert info["n_samples"] == 569
    assert info["shape"] == [569, 31]
    assert info["columns"] == [str(c) for c in frame.columns]
    assert "target" in info["columns"]
    assert info["dtypes"]["target"] == "int64"
    assert info["dtypes"]["mean radius"] == "float64"


def test_csv_with_utf8_bom_header(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffa,b\n1,2\n".encode())
    assert inspect_csv(path)["columns"] == ["a", "b"]


def test_csv_missing(tmp_path: Path) -> None:
    with pytest.raises(FedlabDatasetError, match="does not exist; check the --path"):
        inspect_csv(tmp_path / "nope.csv")


def test_csv_directory(tmp_path: Path) -> None:
    with pytest.raises(FedlabDatasetError, match="is a directory, not a CSV file"):
        inspect_csv(tmp_path)


def test_csv_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(FedlabDatasetError, match="is empty"):
        inspect_csv(path)


def test_csv_blank_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("\n\n\n")
    with pytest.raises(FedlabDatasetError, match="has no columns"):
        inspect_csv(path)


def test_csv_header_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,c\n")
    with pytest.raises(FedlabDatasetError, match="no data rows"):
        inspect_csv(path)


def test_csv_ragged_rows(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(FedlabDatasetError, match="cannot be parsed") as info:
        inspect_csv(path)
    assert "\n" not in str(info.value)


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("name,town\nJosé,Besançon\n".encode("latin-1"))
    with pytest.raises(FedlabDatasetError, match="not UTF-8 text.*save it as UTF-8"):
        inspect_csv(path)


def test_csv_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "random.csv"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(FedlabDatasetError, match="CSV file .*random.csv"):
        inspect_csv(path)


def test_csv_png_renamed_to_csv(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.png")
    renamed = path.rename(tmp_path / "x.csv")
    with pytest.raises(FedlabDatasetError, match=str(renamed)):
        inspect_csv(renamed)


def test_csv_duplicate_columns(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a,c,b\n1,2,3,4,5\n")
    with pytest.raises(FedlabDatasetError, match="duplicate column name.*'a', 'b'"):
        inspect_csv(path)


def test_csv_column_named_like_pandas_suffix_is_not_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,a.1\n1,2\n")
    assert inspect_csv(path)["columns"] == ["a", "a.1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_csv_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.csv"
    path.write_text("a\n1\n")
    path.chmod(0)
    try:
        with pytest.raises(FedlabDatasetError, match="cannot read CSV file"):
            inspect_csv(path)
    finally:
        path.chmod(0o600)


# --- images -----------------------------------------------------------------------------------


def test_images_metadata(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"dog": 2, "cat": 3}, size=(8, 6))
    info = inspect_images(root)
    assert info == {
        "n_samples": 5,
        "classes": ["cat", "dog"],
        "image_shape": [6, 8],
        "channels": 3,
        "shape": [5, 6, 8, 3],
    }


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("RGBA", 4), ("LA", 2), ("1", 1)])
def test_images_channels_from_mode(tmp_path: Path, mode: str, channels: int) -> None:
    root = make_image_folder(tmp_path, {"a": 1, "b": 1}, size=(4, 4), mode=mode)
    assert inspect_images(root)["channels"] == channels


def test_images_all_extensions_case_insensitive(tmp_path: Path) -> None:
    suffixes = [".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".JPEG", ".bmp", ".Bmp", ".tif", ".tiff", ".TIFF"]
    for i, suffix in enumerate(suffixes):
        make_image(tmp_path / ("a" if i % 2 else "b") / f"{i}{suffix}", (5, 7), mode="L")
    info = inspect_images(tmp_path)
    assert info["n_samples"] == len(suffixes)
    assert info["image_shape"] == [7, 5]
    assert info["channels"] == 1


def test_images_gif(tmp_path: Path) -> None:
    make_image(tmp_path / "a" / "1.gif", (4, 3), mode="P")
    make_image(tmp_path / "b" / "2.GIF", (4, 3), mode="P")
    info = inspect_images(tmp_path)
    assert info["n_samples"] == 2
    assert info["shape"] == [2, 3, 4, 1]


def test_images_ignore_other_and_hidden_entries(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / "README.txt").write_text("notes")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "labels.csv").write_text("x\n1\n")
    make_image(tmp_path / ".cache" / "thumb.png", (2, 2))
    make_image(tmp_path / "a" / "nested" / "deep.png", (3, 3))
    info = inspect_images(tmp_path)
    assert info["classes"] == ["a", "b"]
    assert info["n_samples"] == 3


def test_images_missing(tmp_path: Path) -> None:
    with pytest.raises(FedlabDatasetError, match="does not exist"):
        inspect_images(tmp_path / "nope")


def test_images_path_is_a_file(tmp_path: Path) -> None:
    path = make_image(tmp_path / "one.png")
    with pytest.raises(FedlabDatasetError, match="not a directory; --type images needs a folder"):
        inspect_images(path)


def test_images_no_class_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "loose.png")
    with pytest.raises(FedlabDatasetError, match="no class sub-folders"):
        inspect_images(tmp_path)


def test_images_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FedlabDatasetError, match="no class sub-folders"):
        inspect_images(tmp_path)


def test_images_class_folder_without_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(FedlabDatasetError, match="class folder.*'dog'.*hold no images"):
        inspect_images(tmp_path)


def test_images_unreadable_file_is_named(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "dog" / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(FedlabDatasetError, match=r"dog/broken\.png.*not a readable image"):
        inspect_images(tmp_path)


def test_images_different_sizes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 2}, size=(8, 6))
    make_image(tmp_path / "dog" / "big.png", (16, 12))
    with pytest.raises(FedlabDatasetError, match="2 different shapes") as info:
        inspect_images(tmp_path)
    message = str(info.value)
    assert "6x8 RGB" in message
    assert "12x16 RGB" in message
    assert "dog/big.png" in message
    assert "all images must share one shape" in message


def test_images_different_modes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 1}, mode="RGB")
    make_image_folder(tmp_path, {"dog": 1}, mode="L")
    with pytest.raises(FedlabDatasetError, match="all images must share one shape") as info:
        inspect_images(tmp_path)
    assert "6x8 RGB" in str(info.value)
    assert "6x8 L" in str(info.value)


def test_images_many_shapes_lists_at_most_five(tmp_path: Path) -> None:
    for i in range(8):
        make_image(tmp_path / "a" / f"{i}.png", (i + 1, 2))
    with pytest.raises(FedlabDatasetError, match="8 different shapes") as info:
        inspect_images(tmp_path)
    message = str(info.value)
    assert message.count("(e.g.") == 5
    assert "and 3 more" in message


def test_csv_os_error_is_translated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a\n1\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pd, "read_csv", refuse)
    with pytest.raises(FedlabDatasetError, match="cannot read CSV file .*Permission denied"):
        inspect_csv(path)
