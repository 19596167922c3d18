"""mmseg dataset over the image / mask pairs that :class:`~ibot_bench.data.ade20k.ADE20KDataset`
checked, so the run trains and scores exactly those.

mmseg's own ``BaseSegDataset`` lists the image folder again by the case-sensitive suffix
``.jpg`` and walks its subfolders: an ADE20K image named ``.JPG`` was silently left out of
training and of the val mIoU, and a stray subfolder of images was added.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmseg.datasets import BaseSegDataset


class PairedSegDataset(BaseSegDataset):
    """``BaseSegDataset`` whose samples are the ``[image, mask]`` pairs of ``pairs_file``."""

    def __init__(self, pairs_file: str, **kwargs) -> None:
        self.pairs_file = pairs_file
        super().__init__(**kwargs)

    def load_data_list(self) -> list[dict]:
        pairs = json.loads(Path(self.pairs_file).read_text())
        return [
            {
                "img_path": image,
                "seg_map_path": mask,
                "label_map": self.label_map,
                "reduce_zero_label": self.reduce_zero_label,
                "seg_fields": [],
            }
            for image, mask in pairs
        ]
