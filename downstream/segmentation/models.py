"""mmseg configs of the segmentation protocols (UperNet from mmseg's base file; linear head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ibot_bench.data.ade20k import ADE20K_NUM_CLASSES, ADE20KDataset
from ibot_bench.dense.runner import (
    TEST_FIX,
    DenseRuntime,
    optim_wrapper,
    per_process_batch,
    runtime_config,
    stoppable_loader,
)
from ibot_bench.io import atomic_write_text


def mmseg_base_model(name: str) -> dict[str, Any]:
    """The ``model`` dict of one of mmseg's shipped base configs (as a plain dict)."""
    import mmseg
    from mmengine.config import Config

    path = Path(mmseg.__file__).parent / ".mim" / "configs" / "_base_" / "models" / name
    return Config.fromfile(str(path)).to_dict()["model"]


def class_names(ds: ADE20KDataset) -> list[str]:
    """The dataset's names (``classes.txt``), or mmseg's ADE20K names for the real set."""
    if not (ds.root / "classes.txt").is_file() and ds.num_classes == ADE20K_NUM_CLASSES:
        from mmseg.datasets import ADE20KDataset as MMSegADE20K

        return list(MMSegADE20K.METAINFO["classes"])
    return list(ds.class_names)


def segmentor(cfg, rt: DenseRuntime, encoder_spec: str, num_classes: int) -> dict[str, Any]:
    """UperNet (+ auxiliary FCN, weight 0.4) or the linear head on the encoder backbone."""
    norm = {"type": rt.norm, "requires_grad": True}
    backbone = {
        "type": "IbotBenchViT",
        "encoder": encoder_spec,
        "out_indices": cfg.out_indices,
        "img_size": cfg.crop_size,  # pos_embed interpolated to the training crop
        "norm": rt.norm,
    }
    if cfg.head == "linear":
        backbone.update(out_strides=None, final_norm=True, frozen=True)
        model = mmseg_base_model("fcn_r50-d8.py")
        model.pop("auxiliary_head", None)
        model["decode_head"] = {
            "type": "FCNHead",
            "in_channels": [rt.embed_dim] * 4,
            "in_index": [0, 1, 2, 3],
            "input_transform": "resize_concat",
            "channels": 4 * rt.embed_dim,
            "num_convs": 0,
            "concat_input": False,
            "kernel_size": 1,
            "dropout_ratio": 0.0,
            "num_classes": num_classes,
            "norm_cfg": norm,
            "align_corners": False,
            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
        }
    else:
        backbone.update(drop_path=rt.drop_path)
        model = mmseg_base_model("upernet_r50.py")
        dec, aux = model["decode_head"], model["auxiliary_head"]
        dec.update(in_channels=[rt.embed_dim] * 4, num_classes=num_classes, norm_cfg=norm)
        aux.update(in_channels=rt.embed_dim, num_classes=num_classes, norm_cfg=norm)
    model["pretrained"] = None
    model["backbone"] = backbone
    model["data_preprocessor"]["size"] = (cfg.crop_size, cfg.crop_size)
    crop = (cfg.crop_size, cfg.crop_size)
    model["test_cfg"] = (
        {"mode": "slide", "crop_size": crop, "stride": (cfg.slide_stride, cfg.slide_stride)}
        if cfg.eval_mode == "slide"
        else {"mode": "whole"}
    )
    return model


def pipelines(cfg, num_classes: int) -> tuple[list[dict], list[dict]]:
    """Train and test pipelines; each mask is checked (:class:`CheckSegMap`) before mmseg
    loads it."""
    scale = tuple(cfg.img_scale)
    crop = (cfg.crop_size, cfg.crop_size)
    train = [
        {"type": "LoadImageNamingFile"},
        {"type": "CheckSegMap", "num_classes": num_classes},
        {"type": "LoadAnnotations", "reduce_zero_label": True},
        {
            "type": "RandomResize",
            "scale": scale,
            "ratio_range": tuple(cfg.ratio_range),
            "keep_ratio": True,
        },
        {"type": "RandomCrop", "crop_size": crop, "cat_max_ratio": 0.75},
        {"type": "RandomFlip", "prob": 0.5},
        {"type": "PhotoMetricDistortion"},
        {"type": "PackSegInputs"},
    ]
    test = [
        {"type": "LoadImageNamingFile", "fix": TEST_FIX},
        {"type": "CheckSegMap", "num_classes": num_classes, "fix": TEST_FIX},
        {"type": "Resize", "scale": scale, "keep_ratio": True},
        {"type": "LoadAnnotations", "reduce_zero_label": True},
        {"type": "PackSegInputs"},
    ]
    return train, test


def _dataset(
    ds: ADE20KDataset, classes: list[str], pipeline: list[dict], work_dir: Path
) -> dict[str, Any]:
    """mmseg's view of ``ds``: the very pairs it checked (:mod:`ibot_bench.dense.seg_dataset`)."""
    pairs = [[str(image), str(mask)] for image, mask in ds.pairs]
    pairs_file = atomic_write_text(work_dir / f"ade20k_{ds.split}_pairs.json", json.dumps(pairs))
    return {
        "type": "PairedSegDataset",
        "pairs_file": str(pairs_file),
        "data_root": str(ds.root),
        "reduce_zero_label": True,
        "metainfo": {"classes": tuple(classes)},
        "pipeline": pipeline,
    }


def lr_schedule(warmup: int, iters: int) -> list[dict[str, Any]]:
    """Linear warm-up, then poly (power 1) decay to 0 per iteration."""
    schedule = [
        {"type": "LinearLR", "start_factor": 1e-6, "by_epoch": False, "begin": 0, "end": warmup}
    ]
    if warmup < iters:
        schedule.append(
            {
                "type": "PolyLR",
                "eta_min": 0.0,
                "power": 1.0,
                "begin": warmup,
                "end": iters,
                "by_epoch": False,
            }
        )
    return schedule


def build_segmentation_config(
    cfg,
    rt: DenseRuntime,
    encoder_spec: str,
    train: ADE20KDataset,
    val: ADE20KDataset,
    lr: float,
    work_dir: Path,
) -> dict[str, Any]:
    """The complete mmengine config of one segmentation run."""
    classes = class_names(train)
    train_pipe, test_pipe = pipelines(cfg, len(classes))
    loader = stoppable_loader(cfg.num_workers, cfg.seed)
    config = runtime_config(
        device=rt.device,
        scope="mmseg",
        work_dir=work_dir,
        seed=cfg.seed,
        checkpoint_interval=cfg.checkpoint_every,
        by_epoch=False,
        log_every=cfg.log_every,
    )
    warmup = min(cfg.warmup_iters, cfg.iters)
    config.update(
        model=segmentor(cfg, rt, encoder_spec, len(classes)),
        train_dataloader={
            **loader,
            "batch_size": per_process_batch(cfg.batch_size),
            "sampler": {"type": "InfiniteSampler", "shuffle": True},
            "dataset": _dataset(train, classes, train_pipe, work_dir),
        },
        test_dataloader={
            **loader,
            "batch_size": 1,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "dataset": _dataset(val, classes, test_pipe, work_dir),
        },
        test_evaluator={"type": "IoUMetric", "iou_metrics": ["mIoU"]},
        test_cfg={"type": "TestLoop"},
        train_cfg={"type": "IterBasedTrainLoop", "max_iters": cfg.iters, "val_interval": cfg.iters},
        optim_wrapper=optim_wrapper(rt, lr, cfg.weight_decay, cfg.clip_grad),
        param_scheduler=lr_schedule(warmup, cfg.iters),
    )
    return config
