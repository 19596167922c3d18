"""mmdet configs of the detection protocol, built from mmdet's own base model files.

Mask R-CNN and Cascade Mask R-CNN start from mmdet's ``_base_/models/*_r50_fpn.py`` with the
backbone replaced by ``IbotBenchViT`` and the FPN fed with the ViT width; the cascade's box
heads become the paper's 4conv1fc heads with GIoU loss (docs/protocols.md#detection).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ibot_bench.data.coco import CocoDataset, preview_ids
from ibot_bench.dense.runner import (
    TEST_FIX,
    DenseRuntime,
    optim_wrapper,
    per_process_batch,
    runtime_config,
)
from ibot_bench.errors import DatasetError

BASE_MODELS = {
    "mask-rcnn": "mask-rcnn_r50_fpn.py",
    "cascade-mask-rcnn": "cascade-mask-rcnn_r50_fpn.py",
}
# box-coder target stds of the three cascade stages (as in mmdet's cascade base config)
CASCADE_STDS = ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
MULTISCALE_SHORT = tuple(range(480, 801, 32))  # Swin / iBOT multi-scale training
CROP_SHORT = (400, 500, 600)


def mmdet_base_model(name: str) -> dict[str, Any]:
    """The ``model`` dict of one of mmdet's shipped base configs (as a plain dict)."""
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "_base_" / "models" / name
    return Config.fromfile(str(path)).to_dict()["model"]


def check_categories(train: CocoDataset, val: CocoDataset, classes: list[str] | None) -> list[str]:
    """The class names to train on; errors when the files and the config disagree.

    With ``classes`` unset the train file's categories (id order) are used and the val file
    must list the same; with ``classes`` set, both files must list exactly those names.
    """
    names = {
        split: [c["name"] for c in ds.categories] for split, ds in (("train", train), ("val", val))
    }
    if not names["train"]:
        raise DatasetError(f"{train.ann_file} lists no categories; it cannot train a detector.")
    wanted = list(classes) if classes is not None else names["train"]
    for split, found in names.items():
        if found != wanted:
            source = "the config's classes" if classes is not None else "the train file"
            ds = train if split == "train" else val
            raise DatasetError(
                f"COCO categories of {ds.ann_file} do not match {source}:\n"
                f"  file:   {found}\n  wanted: {wanted}\n"
                "Fix the annotation file, or set classes to the file's names (classes=null uses "
                "the train file's)."
            )
    return wanted


def _usable_box(ann: dict) -> bool:
    """A box mmdet trains on: not a crowd, at least 1 px wide and high (mmdet's own rule)."""
    _, _, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w >= 1 and h >= 1 and ann["area"] > 0


def _short_polygons(anns: list[dict]) -> list:
    """Ids of annotations with a polygon of fewer than 3 points (COCOeval fails on them)."""
    return [
        a["id"]
        for a in anns
        if isinstance(a["segmentation"], list)
        and any(len(poly) < 6 or len(poly) % 2 for poly in a["segmentation"])
    ]


def check_instances(train: CocoDataset, val: CocoDataset) -> None:
    """Refuse splits that would train on nothing or score nothing, before any training.

    mmdet skips crowd and sub-pixel boxes, so training needs one other box; COCO evaluation
    reports -1 (a -100 AP record) without ground truth, and fails on a polygon of fewer than
    3 points only when it scores masks, after training.
    """
    if not any(_usable_box(a) for a in train.coco.anns.values()):
        raise DatasetError(
            f"{train.ann_file} has no box to train on: detection needs annotations that are "
            "not crowds, at least 1 px wide and high (mmdet skips the others)."
        )
    if not any(not a.get("iscrowd", 0) for a in val.coco.anns.values()):
        raise DatasetError(
            f"{val.ann_file} has no (non-crowd) annotation: COCO evaluation has nothing to "
            "score; use a val split with annotations."
        )
    short = _short_polygons(list(val.coco.anns.values()))
    if short:
        raise DatasetError(
            f"{val.ann_file}: {len(short)} annotation(s) (id {preview_ids(short)}) have a polygon of fewer than 3 "
            "points, which COCO evaluation cannot score; fix or remove them."
        )


def _cascade_box_head(num_classes: int, stds: list[float], norm: str) -> dict[str, Any]:
    return {
        "type": "ConvFCBBoxHead",
        "num_shared_convs": 4,
        "num_shared_fcs": 1,
        "in_channels": 256,
        "conv_out_channels": 256,
        "fc_out_channels": 1024,
        "roi_feat_size": 7,
        "num_classes": num_classes,
        "bbox_coder": {
            "type": "DeltaXYWHBBoxCoder",
            "target_means": [0.0, 0.0, 0.0, 0.0],
            "target_stds": stds,
        },
        "reg_class_agnostic": False,
        "reg_decoded_bbox": True,
        "norm_cfg": {"type": norm, "requires_grad": True},
        "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 10.0},
    }


def detector(cfg, rt: DenseRuntime, encoder_spec: str, num_classes: int) -> dict[str, Any]:
    """Mask R-CNN / Cascade Mask R-CNN with the encoder backbone and ``num_classes``."""
    model = mmdet_base_model(BASE_MODELS[cfg.model])
    model["backbone"] = {
        "type": "IbotBenchViT",
        "encoder": encoder_spec,
        "out_indices": cfg.out_indices,
        "drop_path": rt.drop_path,
        "frozen": cfg.frozen,
        "norm": rt.norm,
        "img_size": None,  # detection inputs vary in size: pos_embed resized per forward
    }
    model["neck"]["in_channels"] = [rt.embed_dim] * 4
    roi = model["roi_head"]
    if cfg.model == "cascade-mask-rcnn":
        roi["bbox_head"] = [_cascade_box_head(num_classes, list(s), rt.norm) for s in CASCADE_STDS]
    else:
        roi["bbox_head"]["num_classes"] = num_classes
    roi["mask_head"]["num_classes"] = num_classes
    stages = model["train_cfg"]["rcnn"]
    for stage in stages if isinstance(stages, list) else [stages]:
        stage["sampler"]["num"] = cfg.rois_per_image
    model["train_cfg"]["rpn_proposal"]["max_per_img"] = cfg.proposals_per_image
    model["test_cfg"]["rpn"]["max_per_img"] = cfg.proposals_per_image
    model["test_cfg"]["rcnn"]["max_per_img"] = cfg.detections_per_image
    return model


def pipelines(cfg) -> tuple[list[dict], list[dict]]:
    """Train and test pipelines: the Swin / iBOT multi-scale recipe, or one resize."""
    long, short = cfg.img_scale
    load = [
        {"type": "LoadImageNamingFile"},
        {"type": "LoadAnnotations", "with_bbox": True, "with_mask": True},
    ]
    if cfg.multiscale:
        scales = [(s * long // 800, s) for s in MULTISCALE_SHORT]
        crop_scales = [(s * long // 800, s) for s in CROP_SHORT]
        resize = [
            {
                "type": "RandomChoice",
                "transforms": [
                    [{"type": "RandomChoiceResize", "scales": scales, "keep_ratio": True}],
                    [
                        {"type": "RandomChoiceResize", "scales": crop_scales, "keep_ratio": True},
                        {
                            "type": "RandomCrop",
                            "crop_type": "absolute_range",
                            "crop_size": (384 * short // 800, 600 * short // 800),
                            "allow_negative_crop": True,
                        },
                        {"type": "RandomChoiceResize", "scales": scales, "keep_ratio": True},
                    ],
                ],
            }
        ]
    else:
        resize = [{"type": "Resize", "scale": (long, short), "keep_ratio": True}]
    train = [*load, {"type": "RandomFlip", "prob": 0.5}, *resize, {"type": "PackDetInputs"}]
    test = [
        {"type": "LoadImageNamingFile", "fix": TEST_FIX},
        {"type": "Resize", "scale": (long, short), "keep_ratio": True},
        {"type": "LoadAnnotations", "with_bbox": True, "with_mask": True},
        {
            "type": "PackDetInputs",
            "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
        },
    ]
    return train, test


def _dataset(ds: CocoDataset, classes: list[str], pipeline: list[dict], test: bool) -> dict:
    return {
        "type": "CocoDataset",
        "data_root": str(ds.root),
        "ann_file": str(ds.ann_file),
        "data_prefix": {"img": str(ds.image_dir) + "/"},
        "metainfo": {"classes": tuple(classes)},
        "filter_cfg": None if test else {"filter_empty_gt": True, "min_size": 0},
        "pipeline": pipeline,
        "test_mode": test,
    }


def build_detection_config(
    cfg,
    rt: DenseRuntime,
    encoder_spec: str,
    train: CocoDataset,
    val: CocoDataset,
    classes: list[str],
    work_dir: Path,
    milestones: list[int],
) -> dict[str, Any]:
    """The complete mmengine config of one detection run."""
    train_pipe, test_pipe = pipelines(cfg)
    loader = {
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
    }
    config = runtime_config(
        device=rt.device,
        scope="mmdet",
        work_dir=work_dir,
        seed=cfg.seed,
        checkpoint_interval=1,
        by_epoch=True,
        log_every=cfg.log_every,
    )
    model = detector(cfg, rt, encoder_spec, len(classes))
    config.update(
        model=model,
        train_dataloader={
            **loader,
            "batch_size": per_process_batch(cfg.batch_size),
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "batch_sampler": {"type": "AspectRatioBatchSampler"},
            "dataset": {
                **_dataset(train, classes, train_pipe, test=False),
                "indices": cfg.train_images,  # the first N images only (None: all)
            },
        },
        test_dataloader={
            **loader,
            "batch_size": 1,
            "drop_last": False,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "dataset": _dataset(val, classes, test_pipe, test=True),
        },
        test_evaluator={
            "type": "CocoMetric",
            "ann_file": str(val.ann_file),
            "metric": ["bbox", "segm"],
            "format_only": False,
        },
        test_cfg={"type": "TestLoop"},
        train_cfg={
            "type": "EpochBasedTrainLoop",
            "max_epochs": cfg.epochs,
            "val_interval": cfg.epochs,
        },
        optim_wrapper=optim_wrapper(rt, cfg.lr, cfg.weight_decay, cfg.clip_grad),
        param_scheduler=[
            {
                "type": "LinearLR",
                "start_factor": 0.001,
                "by_epoch": False,
                "begin": 0,
                "end": cfg.warmup_iters,
            },
            {
                "type": "MultiStepLR",
                "begin": 0,
                "end": cfg.epochs,
                "by_epoch": True,
                "milestones": milestones,
                "gamma": 0.1,
            },
        ],
        auto_scale_lr={"enable": False, "base_batch_size": 16},
    )
    return copy.deepcopy(config)
