"""What ``medmetric index`` and ``medmetric search`` accept as images: files, folders, CSVs.

* an image file: one unlabelled image;
* a folder: its ``<class>/<image>`` subfolders (labelled by folder name) and images directly in
  it (unlabelled);
* a ``.csv`` file: column ``path`` (relative to the CSV's folder, or absolute; HDF5 patch
  references ``file.h5::dataset[i]`` work too) and optional ``label``.

Returns a DataFrame with columns path and label (empty string: unknown).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medmetric.datamodules.base import read_csv_checked
from medmetric.datamodules.histopathology import PATCH_SUFFIXES, class_folder_index, list_images


def read_image_sources(sources: Sequence[str]) -> pd.DataFrame:
    parts = []
    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix.lower() == ".csv":
            table = read_csv_checked(path, ("path",), "image CSV")
            empty = table["path"].isna()
            if empty.any():
                raise ValueError(f"{path}, row {int(empty.to_numpy().argmax()) + 2}, column 'path': empty value")
            labels = table["label"].fillna("") if "label" in table.columns else ""
            paths = [p if Path(p.split("::")[0]).is_absolute() else str(path.parent / p) for p in table["path"]]
            parts.append(pd.DataFrame({"path": paths, "label": labels}))
        elif path.is_file():
            if path.suffix.lower() not in PATCH_SUFFIXES:
                raise ValueError(f"{path}: not an image ({', '.join(PATCH_SUFFIXES)}) or a .csv list of images")
            parts.append(pd.DataFrame({"path": [str(path)], "label": [""]}))
        elif path.is_dir():
            labelled = class_folder_index(path)[["path", "label"]]
            loose = pd.DataFrame({"path": [str(p) for p in list_images(path)], "label": ""})
            parts += [labelled, loose]
        else:
            raise FileNotFoundError(f"{path}: no such image, folder or CSV")
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["path", "label"])
    if table.empty:
        raise ValueError(f"no images found in {list(sources)} (looked for {', '.join(PATCH_SUFFIXES)} files and class folders)")
    table["label"] = table["label"].astype(str)
    return table
