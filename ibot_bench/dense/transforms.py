"""Pipeline steps that turn a bad image or mask file into a DatasetError naming it.

mmcv's image loader fails with a bare ``AssertionError: failed to load image`` and mmseg's
mask loader with an ``AttributeError`` on ``None``, both in a loader worker and, for the
val split, only after the whole training. mmseg checks neither a mask's size nor its values:
a mask of another size trains on misaligned labels, and a value above the class count
crashes the loss (on CUDA a device-side assert) or, in val, lowers mIoU without a word.
``fix`` is the advice that ends the message (val pipelines: :data:`~ibot_bench.dense.runner.TEST_FIX`).
"""

from __future__ import annotations

import numpy as np
from mmcv.transforms import BaseTransform, LoadImageFromFile

from ibot_bench.data.ade20k import read_mask
from ibot_bench.errors import DatasetError

TRAIN_FIX = "replace or remove it, then rerun"


class LoadImageNamingFile(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile``; a file it cannot read is a DatasetError naming it."""

    def __init__(self, fix: str = TRAIN_FIX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fix = fix

    def transform(self, results: dict) -> dict | None:
        try:
            return super().transform(results)
        except (AssertionError, OSError) as exc:  # mmcv asserts that the decoder gave an image
            reason = "it does not decode" if isinstance(exc, AssertionError) else exc
            raise DatasetError(
                f"cannot read image {results['img_path']}: {reason}; {self.fix}."
            ) from None


class CheckSegMap(BaseTransform):
    """Check ``seg_map_path`` before mmseg's ``LoadAnnotations`` reads it: it decodes, has
    the loaded image's size, and holds only 0 (unlabelled), 1..``num_classes`` and 255."""

    def __init__(self, num_classes: int, fix: str = TRAIN_FIX) -> None:
        self.num_classes, self.fix = num_classes, fix

    def transform(self, results: dict) -> dict:
        path = results["seg_map_path"]
        mask = read_mask(path, results["ori_shape"][:2], self.fix)
        values = np.unique(mask)
        bad = values[(values > self.num_classes) & (values != 255)]
        if bad.size:
            raise DatasetError(
                f"ADE20K mask {path} holds value(s) {bad.tolist()} above the "
                f"{self.num_classes} classes (masks hold 0 = unlabelled, 1..{self.num_classes}, "
                f"255 = ignored): fix the mask or the class list (classes.txt); {self.fix}."
            )
        return results
