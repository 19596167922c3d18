"""Any encoder runs every protocol: a timm CNN (no CLS token) and a 2-block ViT (< 4 blocks).

Every frozen protocol runs through the real runner with its default settings (only size
knobs shrunk: epochs, ks, c_grid, restarts, img_size); fine-tuning runs on the CNN with the
layer-decay mode it used recorded; dense tasks on the CNN are not applicable, before any
mmdet / mmseg work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import make_imagefolder

from ibot_bench.downstream.detection import DetectionConfig, detection
from ibot_bench.downstream.finetune import FinetuneModel, param_groups
from ibot_bench.downstream.segmentation import SegmentationConfig, segmentation
from ibot_bench.encoders import load_encoder
from ibot_bench.encoders.vit import ViTConfig, build_vit
from ibot_bench.errors import NotApplicableError, UserError
from ibot_bench.evaluate import run_eval
from ibot_bench.features import FeatureConfig, extract_features
from ibot_bench.tasks import TaskContext

# feature settings every run shares (so each encoder's features are extracted once)
FEATURES = ["features.img_size=32", "features.num_workers=0"]
# size knobs only: every protocol setting stays at its default
SIZE = {
    "knn": [],
    "linear": ["epochs=2"],
    "linear-paper": ["epochs=2"],
    "logreg": ["c_grid=[0.1,10.0]"],
    "cluster": ["restarts=2", "niter=10"],
    # the 10% protocol: 1% of 50 images per class leaves no hold-out for the linear head
    "semi": ["fraction=0.1", "linear.epochs=2", "logreg.c_grid=[0.1,10.0]"],
    "cluster-head": [],
}
FROZEN = list(SIZE)


def make_ibot_vit(path: Path, dim: int = 64, depth: int = 2) -> Path:
    """A ``depth``-block ViT (patch 8, 32 px) with a projection head, official iBOT layout."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(dim, depth, 1, patch_size=8, img_size=32))
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for name, shape in {"mlp.0": (24, dim), "mlp.2": (24, 24), "mlp.4": (16, 24)}.items():
        teacher[f"head.{name}.weight"] = torch.randn(shape, generator=g) * 0.1
        teacher[f"head.{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)
    teacher["head.last_layer.weight_v"] = torch.randn(8, 16, generator=g)
    # a custom width: the file names its heads (ibot: never guesses them)
    torch.save({"teacher": teacher, "epoch": 1, "args": {"num_heads": 1}}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("any-encoder")
    cnn = d / "resnet10t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), cnn)
    return {
        "cnn": f"timm:resnet10t:{cnn}",
        "vit": f"ibot:{make_ibot_vit(d / 'vit2.pth')}",
        "data": f"imagefolder:{make_imagefolder(d / 'data', classes=3, per_class=50)}",
        "out": d / "out",
        "cache": d / "cache",
    }


def evaluate(setup: dict, task: str, encoder: str, overrides: list[str] = ()):
    return run_eval(
        task,
        setup[encoder],
        setup["data"],
        overrides=[*FEATURES, *SIZE.get(task, []), *overrides],
        output_dir=setup["out"],
        cache_dir=setup["cache"],
        log=lambda _m: None,
    )


def check_record(setup: dict, record) -> None:
    assert (setup["out"] / "records" / f"{record.key()}.json").is_file()
    assert record.config["features"]["n_last_blocks"] is None  # the default: min(4, depth)
    assert record.metrics


def linear_variants(details: dict, encoder: str) -> None:
    """What the linear probe trained: all three variants on the ViT (cls_last4 = its 2
    blocks), only the pooled ``cls`` on the CNN, the others skipped with their reason."""
    variants = details["variants"]
    assert variants["requested"] == ["cls", "cls_last4", "cls_patch"]
    if encoder == "cnn":
        assert variants["used"] == ["cls"] and variants["cls_last4_blocks"] is None
        assert set(variants["skipped"]) == {"cls_last4", "cls_patch"}
        assert "no CLS token" in variants["skipped"]["cls_last4"]
        assert variants["cls"] == "pooled features (no CLS token)"
        assert {h["feature"] for h in details["heads"]} == {"cls"}
    else:
        assert variants["used"] == ["cls", "cls_last4", "cls_patch"] and not variants["skipped"]
        assert variants["cls_last4_blocks"] == 2
        assert {h["feature"] for h in details["heads"]} == set(variants["used"])


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
@pytest.mark.parametrize("task", FROZEN)
def test_every_frozen_protocol_runs_with_defaults(setup, task, encoder):
    if task == "cluster-head" and encoder == "cnn":
        with pytest.raises(NotApplicableError, match="projection head"):
            evaluate(setup, task, encoder)
        return
    record = evaluate(setup, task, encoder)
    check_record(setup, record)
    details = record.details
    source = "pooled features (no CLS token)" if encoder == "cnn" else "final-norm CLS token"
    if task in ("linear", "linear-paper"):
        linear_variants(details, encoder)
    elif task == "semi":
        linear_variants(details["linear"], encoder)
        for method in ("knn", "logreg"):
            assert details[method]["feature"] == {"variant": "cls", "source": source}
        assert set(record.metrics) >= {"knn_top1", "linear_top1", "logreg_top1"}
    elif task in ("knn", "logreg", "cluster"):
        assert details["feature"] == {"variant": "cls", "source": source}


@pytest.mark.parametrize(("encoder", "blocks", "width"), [("cnn", 0, 0), ("vit", 2, 128)])
def test_feature_meta_records_the_blocks_used(setup, encoder, blocks, width):
    cfg = FeatureConfig(img_size=32, num_workers=0)
    feats = extract_features(
        setup[encoder], setup["data"], "val", cfg, cache_dir=setup["cache"], progress=False
    )
    layout = feats.meta["layout"]
    assert layout["n_last_blocks"] == blocks and layout["block_features"] == (encoder == "vit")
    assert layout["cls_token"] == (encoder == "vit") and feats.cls_last_n.shape[1] == width
    assert feats.meta["key"]["n_last_blocks"] is None


def test_impossible_requests_are_clear_errors(setup):
    with pytest.raises(UserError, match="none of the requested feature variants"):
        evaluate(setup, "linear", "cnn", ["variants=[cls_last4]"])
    with pytest.raises(UserError, match=r"n_last_blocks=4 must be in 0\.\.2"):
        evaluate(setup, "linear", "vit", ["features.n_last_blocks=4"])
    with pytest.raises(UserError, match="needs features.n_last_blocks=4"):
        evaluate(setup, "linear", "vit", ["features.n_last_blocks=2"])
    with pytest.raises(UserError, match="CLS token per block"):
        evaluate(setup, "knn", "cnn", ["features.n_last_blocks=4"])


def test_finetune_on_a_cnn_records_its_layer_decay(setup):
    tiny = ["epochs=1", "warmup_epochs=0", "batch_size=30", "img_size=32", "num_workers=0"]
    record = run_eval(
        "finetune",
        setup["cnn"],
        setup["data"],
        overrides=[*tiny, "eval_batch_size=150"],
        output_dir=setup["out"],
        cache_dir=setup["cache"],
        log=lambda _m: None,
    )
    check_record(setup, record)
    extra = record.details
    assert extra["layer_decay_mode"] == "timm-group-matcher" and extra["layer_decay"] == 0.75
    assert extra["drop_path"] == 0.1 and extra["drop_path_blocks"] == 4  # resnet10t: 4 blocks
    scales = {g["layer_id"]: g["lr_scale"] for g in extra["param_groups"]}
    depth = max(scales) - 1
    assert scales == {i: pytest.approx(0.75 ** (depth + 1 - i)) for i in scales}
    assert "top1" in record.metrics and len(extra["history"]) == 1


def test_layer_decay_without_blocks_is_one_group():
    class Flat(torch.nn.Module):  # no group_matcher: timm cannot tell its blocks
        num_features = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward_features(self, x):
            return self.conv(x)

        def forward_head(self, x, pre_logits=False):
            return x.mean((2, 3))

    groups = param_groups(FinetuneModel(Flat(), num_classes=3), 0.05, layer_decay=0.5)
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_dense_tasks_are_not_applicable_to_a_cnn(setup, monkeypatch):
    import ibot_bench.downstream.detection as det
    import ibot_bench.downstream.segmentation as seg

    def no_mm(task: str) -> None:
        raise AssertionError(f"{task}: mm* touched before the n/a check")

    monkeypatch.setattr(det, "require_mm", no_mm)
    monkeypatch.setattr(seg, "require_mm", no_mm)
    ctx = TaskContext(setup["cnn"], "coco:/nowhere", log=lambda _m: None)
    with pytest.raises(NotApplicableError, match="plain ViT"):
        detection(ctx, DetectionConfig())
    with pytest.raises(NotApplicableError, match="plain ViT"):
        segmentation(ctx, SegmentationConfig())
    load_encoder(setup["vit"]).require_plain_vit("detection")  # a ViT passes
    with pytest.raises(AssertionError, match="mm. touched"):
        detection(TaskContext(setup["vit"], "coco:/nowhere"), DetectionConfig())
