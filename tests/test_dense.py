"""Dense tasks on real mmdet / mmseg / compiled mmcv (CPU, tiny synthetic data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ibot_bench.data.synthetic import write_synthetic
from ibot_bench.dense.backbone import EncoderBackbone, default_out_indices
from ibot_bench.encoders.vit import ViTConfig, build_vit, interpolate_pos_embed_offset
from ibot_bench.errors import ConfigError, DatasetError, UserError
from ibot_bench.evaluate import run_eval


def make_vit_checkpoint(
    path: Path, depth: int = 4, patch: int = 8, img_size: int = 32, dim: int = 64
) -> Path:
    """A small ViT in the official iBOT checkpoint layout (teacher backbone only)."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(dim, depth, 1, patch_size=patch, img_size=img_size))
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"teacher": teacher, "args": {"num_heads": 1}}, path)  # custom width: heads named
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dense")
    write_synthetic(d / "synth", num_classes=3, train_per_class=2, val_per_class=1, image_size=64)
    return {
        "root": d / "synth",
        "ckpt": make_vit_checkpoint(d / "vit.pth"),
        "out": d / "results",
    }


# --- backbone adapter ------------------------------------------------------------------------


def test_default_out_indices_scale_with_depth():
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(4) == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match="out_indices"):
        default_out_indices(3)


@pytest.mark.parametrize(
    ("spec", "dim", "sizes"),
    [
        ("random:vit_small", 384, [(64, 64), (96, 128)]),
        ("random:vit_tiny_patch8", 192, [(64, 64), (32, 96)]),
    ],
)
def test_backbone_outputs_paper_pyramid(spec, dim, sizes):
    backbone = EncoderBackbone(spec).eval()
    assert backbone.out_indices == (3, 5, 7, 11)
    for h, w in sizes:
        with torch.no_grad():
            maps = backbone(torch.randn(1, 3, h, w))
        assert [tuple(m.shape) for m in maps] == [(1, dim, h // s, w // s) for s in (4, 8, 16, 32)]
        assert all(m.is_contiguous() for m in maps)


def test_pyramid_layers_follow_the_paper_for_patch16():
    levels = EncoderBackbone("random:vit_small").levels
    kinds = [[type(m).__name__ for m in getattr(lvl, "children", list)()] for lvl in levels]
    assert kinds[0] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert kinds[1] == ["ConvTranspose2d"]
    assert isinstance(levels[2], nn.Identity) and isinstance(levels[3], nn.MaxPool2d)


def test_depth_without_default_blocks_names_the_option(tmp_path):
    ckpt = make_vit_checkpoint(tmp_path / "d2.pth", depth=2)
    with pytest.raises(ConfigError, match="backbone.out_indices|out_indices"):
        EncoderBackbone(f"ibot:{ckpt}")
    assert len(EncoderBackbone(f"ibot:{ckpt}", out_indices=[0, 1], out_strides=[8, 16]).levels)


def test_pos_embed_interpolated_from_224_to_512_crop(tmp_path):
    ckpt = make_vit_checkpoint(tmp_path / "vit224.pth", patch=16, img_size=224)
    original = torch.load(ckpt)["teacher"]["backbone.pos_embed"]
    backbone = EncoderBackbone(f"ibot:{ckpt}", img_size=512).eval()
    pos = backbone.encoder.model.pos_embed
    assert pos.shape == (1, 1 + 32 * 32, 64)
    expected = interpolate_pos_embed_offset(original, (32, 32), (14, 14))
    torch.testing.assert_close(pos.data, expected)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 512, 512))
    assert maps[2].shape == (1, 64, 32, 32)


def test_frozen_backbone_has_no_trainable_encoder_params():
    backbone = EncoderBackbone("random:vit_tiny_patch8", frozen=True).train()
    assert not any(p.requires_grad for p in backbone.encoder.parameters())
    assert not backbone.encoder.training
    assert all(p.requires_grad for p in backbone.levels.parameters())


def test_non_vit_encoder_is_rejected(tmp_path):
    import timm

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    with pytest.raises(UserError, match="ViT"):
        EncoderBackbone(f"timm:resnet18:{weights}")


# --- layer decay -------------------------------------------------------------------------------


def test_layer_decay_groups_match_the_formula():
    from ibot_bench.dense.optim import layer_decay_groups

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = EncoderBackbone("random:vit_small")
            self.neck = nn.Conv2d(384, 8, 1)

    model = Detector()
    rate, depth = 0.75, 12
    groups = layer_decay_groups(model, base_lr=1e-4, weight_decay=0.05, rate=rate)
    seen = 0
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            seen += 1
            if ".blocks." in name:
                layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
            elif any(k in name for k in ("pos_embed", "cls_token", "patch_embed")):
                layer = 0
            else:  # final norm, pyramid, neck
                layer = depth + 1
            assert g["layer_id"] == layer, name
            assert math.isclose(g["lr"], 1e-4 * rate ** (depth + 1 - layer)), name
            no_wd = p.ndim == 1 or name.endswith((".bias", "pos_embed", "cls_token"))
            assert g["weight_decay"] == (0.0 if no_wd else 0.05), name
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="layer_decay"):
        layer_decay_groups(model, 1e-4, 0.05, rate=1.5)


# --- compiled mmcv ops -----------------------------------------------------------------------


def test_mmcv_roi_align_matches_torchvision_on_backbone_maps():
    from mmcv.ops import roi_align as mmcv_roi_align
    from torchvision.ops import roi_align as tv_roi_align

    backbone = EncoderBackbone("random:vit_tiny_patch8").eval()
    with torch.no_grad():
        feat = backbone(torch.randn(2, 3, 64, 64))[1]  # stride 8
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [1, 10.0, 0.0, 63.0, 50.0]])
    ours = mmcv_roi_align(feat, rois, (7, 7), 1 / 8, 2, "avg", True)
    ref = tv_roi_align(feat, rois, (7, 7), spatial_scale=1 / 8, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_mmcv_ops_names_the_install_command(monkeypatch):
    import ibot_bench.dense.runtime as runtime

    monkeypatch.setattr(runtime, "mmcv_ops_status", lambda: "mmcv is not installed")
    with pytest.raises(UserError, match="setup-dense"):
        runtime.require_mm("detection")


def test_cuda_only_options_on_cpu_are_config_errors(dense, tmp_path):
    from ibot_bench.dense.runtime import resolve_mm_precision, resolve_norm

    with pytest.raises(ConfigError, match="CUDA-only"):
        resolve_mm_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="CUDA-only"):
        resolve_norm("SyncBN", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            run_eval(
                "detection",
                f"ibot:{dense['ckpt']}",
                f"coco:{dense['root'] / 'coco'}",
                overrides=["device=cuda"],
                output_dir=tmp_path,
            )


def _edit_coco(root: Path, split: str, fn) -> None:
    path = root / "coco" / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_coco_categories_mismatch_lists_both(dense, tmp_path):
    import shutil

    root = tmp_path / "synth"
    shutil.copytree(dense["root"], root)
    with pytest.raises(DatasetError, match=r"(?s)file:.*wanted:"):
        run_eval(
            "detection",
            f"ibot:{dense['ckpt']}",
            f"coco:{root / 'coco'}",
            overrides=["classes=[cat,dog,bird]"],
            output_dir=tmp_path / "out",
        )
    _edit_coco(root, "train", lambda d: d.update(annotations=[]))
    with pytest.raises(DatasetError, match="has no box to train on"):
        run_eval(
            "detection", f"ibot:{dense['ckpt']}", f"coco:{root / 'coco'}", output_dir=tmp_path / "o"
        )


# --- one training step + evaluation with the real frameworks ---------------------------------

QUICK_DET = [
    "epochs=1",
    "batch_size=2",
    "warmup_iters=1",
    "multiscale=false",
    "rois_per_image=32",
    "proposals_per_image=50",
    "detections_per_image=10",
    "img_scale=[64,64]",
    "num_workers=0",
    "log_every=1",
]
QUICK_SEG = [
    "iters=1",
    "batch_size=2",
    "crop_size=64",
    "img_scale=[64,64]",
    "warmup_iters=1",
    "slide_stride=48",
    "num_workers=0",
    "log_every=1",
    "checkpoint_every=1",
]


@pytest.mark.parametrize("model", ["mask-rcnn", "cascade-mask-rcnn"])
def test_detection_limits_reach_the_mmdet_model(model):
    from ibot_bench.dense.runner import DenseRuntime
    from ibot_bench.downstream.detection import DetectionConfig, validate
    from ibot_bench.downstream.detection.models import detector

    cfg = DetectionConfig(model=model, rois_per_image=32, proposals_per_image=50,
                          detections_per_image=10)  # fmt: skip
    rt = DenseRuntime("cpu", "fp32", "BN", 0.75, 0.1, 192, 12, 16)
    built = detector(cfg, rt, "random:vit_tiny_patch16", num_classes=3)
    assert built["test_cfg"]["rcnn"]["max_per_img"] == 10
    assert built["test_cfg"]["rpn"]["max_per_img"] == 50
    stages = built["train_cfg"]["rcnn"]
    assert all(
        s["sampler"]["num"] == 32 for s in (stages if isinstance(stages, list) else [stages])
    )
    assert DetectionConfig().detections_per_image == 100  # COCO's maxDets
    with pytest.raises(ConfigError, match="detections_per_image=0: must be >= 1"):
        validate(DetectionConfig(detections_per_image=0))


@pytest.mark.parametrize("model", ["mask-rcnn", "cascade-mask-rcnn"])
def test_detection_trains_and_evaluates(dense, model):
    def detect():
        return run_eval(
            "detection",
            f"ibot:{dense['ckpt']}",
            f"coco:{dense['root'] / 'coco'}",
            overrides=[f"model={model}", *QUICK_DET],
            output_dir=dense["out"],
        )

    record = detect()
    assert record.protocol == f"{model}-1ep"
    assert set(record.metrics) >= {"bbox_ap", "bbox_ap50", "bbox_ap75", "segm_ap"}
    assert all(0.0 <= v <= 100.0 for v in record.metrics.values())
    work = next((dense["out"] / "work").glob("detection__*"))
    assert (work / "last_checkpoint").is_file()
    if model == "mask-rcnn":  # the same run again resumes from its last checkpoint
        again = detect()
        assert again.metrics == record.metrics
        assert again.wall_time_s < record.wall_time_s


@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_segmentation_trains_and_evaluates(dense, head):
    record = run_eval(
        "segmentation",
        f"ibot:{dense['ckpt']}",
        f"ade20k:{dense['root'] / 'ade20k'}",
        overrides=[f"head={head}", *QUICK_SEG],
        output_dir=dense["out"],
    )
    assert record.protocol == {"upernet": "upernet-1it", "linear": "linear-seg-1it"}[head]
    assert set(record.metrics) == {"miou", "macc", "aacc"}
    assert 0.0 <= record.metrics["miou"] <= 100.0


def test_stopped_segmentation_saves_and_resumes_at_that_iteration(dense, tmp_path, monkeypatch):
    """Ctrl-C in an iteration-based run: the step ends, a checkpoint is saved through the run's
    CheckpointHook (last_checkpoint names it) and the rerun trains only the iterations left."""
    import os
    import signal

    from conftest import on_call

    from ibot_bench.interrupt import TrainingInterrupted

    overrides = [o for o in QUICK_SEG if not o.startswith(("iters=", "checkpoint_every="))]
    overrides += ["iters=4", "checkpoint_every=100", "head=linear"]

    def segment():
        return run_eval(
            "segmentation",
            f"ibot:{dense['ckpt']}",
            f"ade20k:{dense['root'] / 'ade20k'}",
            overrides=overrides,
            output_dir=tmp_path,
        )

    real = EncoderBackbone.forward
    training_calls = []

    def counted(self, x):
        if self.training:
            training_calls.append(1)
        return real(self, x)

    stop = on_call(2, lambda: os.kill(os.getpid(), signal.SIGINT), counted)
    monkeypatch.setattr(EncoderBackbone, "forward", stop)
    with pytest.raises(
        TrainingInterrupted, match="stopped by SIGINT; checkpoint saved at iteration 2"
    ):
        segment()
    work = next((tmp_path / "work").glob("segmentation__*"))
    assert (work / "last_checkpoint").read_text().endswith("iter_2.pth")
    monkeypatch.setattr(EncoderBackbone, "forward", counted)
    training_calls.clear()
    record = segment()
    assert len(training_calls) == 2  # iterations 3 and 4
    assert 0.0 <= record.metrics["miou"] <= 100.0
