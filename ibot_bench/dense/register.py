"""Register ibot-bench's pieces in the OpenMMLab registries: importing this is enough.

``IbotBenchViT`` (:class:`~ibot_bench.dense.backbone.EncoderBackbone`) goes into mmdet's and
mmseg's MODELS, ``PairedSegDataset`` into mmseg's DATASETS, ``LayerDecayOptimWrapperConstructor``, the loader workers' init
(``IbotBenchWorkerInit``) and the file-checking pipeline steps of
:mod:`ibot_bench.dense.transforms` into mmengine's (parent of both), so a config can say
``backbone=dict(type="IbotBenchViT", encoder="ibot:ckpt.pth")`` with no ``custom_imports``.
Registration is idempotent.
"""

from __future__ import annotations

import importlib

from mmengine.registry import FUNCTIONS, OPTIM_WRAPPER_CONSTRUCTORS, TRANSFORMS

from ibot_bench.dense.backbone import EncoderBackbone
from ibot_bench.dense.optim import LayerDecayOptimWrapperConstructor
from ibot_bench.dense.runner import worker_init
from ibot_bench.dense.transforms import CheckSegMap, LoadImageNamingFile

BACKBONE_NAME = "IbotBenchViT"

OPTIM_WRAPPER_CONSTRUCTORS.register_module(
    name="LayerDecayOptimWrapperConstructor", module=LayerDecayOptimWrapperConstructor, force=True
)
FUNCTIONS.register_module(name="IbotBenchWorkerInit", module=worker_init, force=True)
for _transform in (LoadImageNamingFile, CheckSegMap):
    TRANSFORMS.register_module(module=_transform, force=True)
for _package in ("mmdet", "mmseg"):
    try:
        _registry = importlib.import_module(f"{_package}.registry")
    except ImportError:  # the other one may be absent; require_mm names what a task needs
        continue
    _registry.MODELS.register_module(name=BACKBONE_NAME, module=EncoderBackbone, force=True)
    if _package == "mmseg":
        from ibot_bench.dense.seg_dataset import PairedSegDataset

        _registry.DATASETS.register_module(module=PairedSegDataset, force=True)
