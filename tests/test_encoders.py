"""Encoder specs: official checkpoint layouts, features, head, pos-embed, errors."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ibot_bench.encoders import ENCODERS, build_head, encoder_fingerprint, load_encoder
from ibot_bench.encoders.checkpoint import _HASH_CACHE, fingerprint
from ibot_bench.encoders.vit import ViTConfig, build_vit
from ibot_bench.errors import CheckpointError, NotApplicableError, UserError
from ibot_bench.pretrain.checkpoint import export_backbone

DIM, DEPTH, PATCH, IMG, OUT = 192, 2, 8, 32, 32


class Evil:
    """A custom class: pickling it into a checkpoint must be refused on load."""


def make_vit(seed: int) -> VisionTransformer:
    """A tiny ViT with random (non-default) weights, standing in for an iBOT backbone."""
    torch.manual_seed(seed)
    m = VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=3, num_classes=0
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def make_head(seed: int) -> dict[str, torch.Tensor]:
    """Head weights in the checkpoint's weight-norm naming (small dims instead of 2048/256)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"mlp.0": (24, DIM), "mlp.2": (24, 24), "mlp.4": (16, 24)}
    head = {}
    for name, shape in shapes.items():
        head[f"{name}.weight"] = torch.randn(shape, generator=g) * 0.1
        head[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    head["last_layer.weight_g"] = torch.rand(OUT, 1, generator=g) + 0.5
    head["last_layer.weight_v"] = torch.randn(OUT, 16, generator=g)
    head["last_layer2.weight_g"] = head["last_layer.weight_g"]  # shared_head=True
    head["last_layer2.weight_v"] = head["last_layer.weight_v"]
    return head


@pytest.fixture(scope="module")
def nets():
    return {"teacher": make_vit(0), "student": make_vit(1), "head": make_head(0)}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, nets):
    """Files in the official layouts (docs/protocols.md#checkpoint-format)."""
    d = tmp_path_factory.mktemp("ckpt")
    t, s, head = nets["teacher"].state_dict(), nets["student"].state_dict(), nets["head"]
    student = {f"module.backbone.{k}": v for k, v in s.items()}
    student["module.backbone.masked_embed"] = torch.zeros(1, DIM)
    student |= {f"module.head.{k}": v.clone() for k, v in head.items()}
    teacher = {f"backbone.{k}": v for k, v in t.items()} | {f"head.{k}": v for k, v in head.items()}
    full = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=PATCH, lr=np.float64(5e-4)),
        "ibot_loss": {"center": torch.zeros(1, OUT)},
    }
    torch.save(full, d / "checkpoint.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in t.items()}}, d / "sd.pth")
    torch.save({"model": dict(t)}, d / "model.pth")
    torch.save({"model_ema": dict(t), "epoch": 3}, d / "model_ema.pth")
    torch.save(dict(t), d / "flat.pth")
    torch.save({f"module._orig_mod.{k}": v for k, v in t.items()}, d / "compiled_ddp.pth")
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "flat.safetensors"))
    return d


def reference(model: VisionTransformer, x: torch.Tensor, dense: tuple[int, ...]) -> dict:
    """Features computed block by block from the source model (iBOT semantics)."""
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        outs = []
        for blk in model.blocks:
            h = blk(h)
            outs.append(h)
        final = model.norm(h)
        grid = (x.shape[2] // PATCH, x.shape[3] // PATCH)
        return {
            "cls": final[:, 0],
            "patch_mean": final[:, 1:].mean(1),
            "cls_last_n": torch.cat([model.norm(o)[:, 0] for o in outs], dim=-1),
            "maps": [
                outs[i][:, 1:].reshape(x.shape[0], *grid, DIM).permute(0, 3, 1, 2) for i in dense
            ],
        }


def assert_features_match(enc, model, x):
    with torch.no_grad():
        got = enc.forward_features(x, n_last_blocks=DEPTH, dense_blocks=(1, 0))
    want = reference(model, x, (1, 0))
    for key in ("cls", "patch_mean", "cls_last_n"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    for g, w in zip(got["maps"], want["maps"], strict=True):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


X = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["", ":teacher", ":student"])
def test_ibot_full_checkpoint(ckpt_dir, nets, which):
    enc = load_encoder(f"ibot:{ckpt_dir / 'checkpoint.pth'}{which}")
    assert not enc.training
    assert (enc.embed_dim, enc.patch_size, enc.num_blocks) == (DIM, PATCH, DEPTH)
    assert_features_match(enc, nets["student" if which == ":student" else "teacher"], X)
    assert enc.info.extra["img_size"] == IMG
    if which == ":student":
        assert "masked_embed" in enc.info.extra["ignored_keys"]


def test_shallow_vit_uses_min_4_depth_last_blocks(ckpt_dir, nets):
    enc = load_encoder(f"ibot:{ckpt_dir / 'checkpoint.pth'}")
    assert enc.cls_token and enc.block_features and enc.plain_vit
    assert enc.default_last_blocks() == DEPTH == enc.resolve_last_blocks(None)  # min(4, 2)
    assert enc.resolve_last_blocks(1) == 1
    assert enc.layout()["n_last_blocks"] == DEPTH and enc.layout(1)["n_last_blocks"] == 1
    assert load_encoder("random:vit_tiny_patch8").default_last_blocks() == 4
    with torch.no_grad():
        none = enc.forward_features(X, n_last_blocks=0)
    assert none["cls_last_n"].shape == (2, 0)
    torch.testing.assert_close(none["cls"], reference(nets["teacher"], X, ())["cls"])
    with pytest.raises(UserError, match=r"must be in 0\.\.2 .*leave features.n_last_blocks unset"):
        enc.forward_features(X, n_last_blocks=4)
    enc.require_plain_vit("detection")


def test_head_state_and_build_head(ckpt_dir, nets):
    enc = load_encoder(f"ibot:{ckpt_dir / 'checkpoint.pth'}")
    hs, raw = enc.head_state, nets["head"]
    assert sorted(hs) == sorted(
        [f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")] + ["last_layer.weight"]
    )
    v, g = raw["last_layer.weight_v"], raw["last_layer.weight_g"]
    torch.testing.assert_close(hs["last_layer.weight"], g * v / v.norm(dim=1, keepdim=True))
    head = build_head(hs)
    z = torch.randn(3, DIM)
    h = F.gelu(F.linear(z, raw["mlp.0.weight"], raw["mlp.0.bias"]))
    h = F.gelu(F.linear(h, raw["mlp.2.weight"], raw["mlp.2.bias"]))
    h = F.normalize(F.linear(h, raw["mlp.4.weight"], raw["mlp.4.bias"]), dim=-1)
    torch.testing.assert_close(head(z), F.linear(h, hs["last_layer.weight"]))
    assert head.patch_logits(z).shape == (3, OUT)
    separate = build_head(hs | {"last_layer2.weight": torch.randn(40, 16)})
    assert separate.patch_logits(z).shape == (3, 40)
    assert load_encoder(f"ibot:{ckpt_dir / 'flat.pth'}").head_state is None


@pytest.mark.parametrize(
    "name",
    [
        "sd.pth",
        "model.pth",
        "model_ema.pth",
        "flat.pth",
        "flat.safetensors",
        "checkpoint.pth",
        "compiled_ddp.pth",
    ],
)
def test_layouts_give_teacher_features(ckpt_dir, nets, name):
    enc = load_encoder(f"dino:{ckpt_dir / name}")
    with torch.no_grad():
        torch.testing.assert_close(enc(X), reference(nets["teacher"], X, ())["cls"])


def _cls(spec: str) -> torch.Tensor:
    with torch.no_grad():
        return load_encoder(spec)(X)


def test_network_under_a_key_prefix_or_nested_wrapper(tmp_path, nets):
    """Weights under one more prefix (``encoder.``, Lightning's ``model.encoder.``) are found
    by their patch embedding, keys outside are ignored; teacher/student inside a wrapper."""
    t, s = nets["teacher"].state_dict(), nets["student"].state_dict()
    want = {n: reference(nets[n], X, ())["cls"] for n in ("teacher", "student")}
    torch.save({f"encoder.{k}": v for k, v in t.items()}, tmp_path / "enc.pth")
    lightning = {f"model.encoder.{k}": v for k, v in t.items()}
    torch.save(
        {"state_dict": lightning | {"model.head.weight": torch.zeros(3, DIM)}}, tmp_path / "pl.pth"
    )
    nested = {"teacher": {f"backbone.{k}": v for k, v in t.items()}, "student": dict(s)}
    torch.save({"state_dict": nested}, tmp_path / "nested.pth")
    torch.testing.assert_close(_cls(f"ibot:{tmp_path / 'enc.pth'}"), want["teacher"])
    enc = load_encoder(f"dino:{tmp_path / 'pl.pth'}")
    assert enc.info.extra["network"] == "state_dict/model.encoder"
    assert enc.info.extra["ignored_keys"] == ["model.head.weight"]
    torch.testing.assert_close(_cls(f"ibot:{tmp_path / 'nested.pth'}"), want["teacher"])
    torch.testing.assert_close(_cls(f"ibot:{tmp_path / 'nested.pth'}:student"), want["student"])
    # a misspelt network names the ones the file holds (it once listed only the teacher's keys)
    with pytest.raises(CheckpointError, match="it holds the network.s. :teacher, :student; the"):
        load_encoder(f"ibot:{tmp_path / 'nested.pth'}:studnet")


def test_several_networks_are_named_and_any_can_be_asked_for(tmp_path, nets):
    """MoCo v3 keeps two encoders under two prefixes: refused with the names, read by name;
    an EMA copy beside a plain one is read when asked for."""
    t, s = nets["teacher"].state_dict(), nets["student"].state_dict()
    moco = {f"module.base_encoder.{k}": v for k, v in s.items()}
    moco |= {f"module.momentum_encoder.{k}": v for k, v in t.items()}
    path = tmp_path / "moco:v3.pth"  # a ':' in the file name stays part of the path
    torch.save({"state_dict": moco}, path)
    with pytest.raises(
        CheckpointError,
        match=rf"2 networks.*'base_encoder', 'momentum_encoder'.*ibot:{path}:base_encoder",
    ):
        load_encoder(f"ibot:{path}")
    torch.testing.assert_close(
        _cls(f"ibot:{path}:base_encoder"), reference(nets["student"], X, ())["cls"]
    )
    torch.testing.assert_close(
        _cls(f"ibot:{path}:momentum_encoder"), reference(nets["teacher"], X, ())["cls"]
    )
    with pytest.raises(CheckpointError, match="no network 'predictor'.*base_encoder \\(30\\)"):
        load_encoder(f"ibot:{path}:predictor")
    torch.save({"model": dict(s), "model_ema": dict(t)}, tmp_path / "deit.pth")
    torch.testing.assert_close(
        _cls(f"ibot:{tmp_path / 'deit.pth'}"), reference(nets["student"], X, ())["cls"]
    )
    ema = f"ibot:{tmp_path / 'deit.pth'}:model_ema"
    torch.testing.assert_close(_cls(ema), reference(nets["teacher"], X, ())["cls"])
    assert (
        load_encoder(ema).info.fingerprint
        != load_encoder(f"ibot:{tmp_path / 'deit.pth'}").info.fingerprint
    )


def test_timm_weights_under_a_key_prefix(tmp_path):
    """timm: the prefix is found by the model's own first weight name; ``PATH:NET`` picks one."""
    net = timm.create_model("test_vit", num_classes=0).eval()
    path = tmp_path / "w.pth"
    torch.save({f"encoder.{k}": v for k, v in net.state_dict().items()}, path)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(load_encoder(f"timm:test_vit:{path}")(x), want)
        torch.testing.assert_close(load_encoder(f"timm:test_vit:{path}:encoder")(x), want)


def test_random_init_follows_the_reference():
    """cls_token and pos_embed truncated-normal with std 0.02 as the reference draws them
    (timm's cls_token std is 1e-6); linear weights std 0.02, biases 0; the fingerprint
    names the initialisation, so features cached under timm's init are not reused."""
    model = load_encoder("random:vit_small").model
    for name in ("cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight"):
        std = model.get_parameter(name).std().item()
        assert 0.017 < std < 0.023, (name, std)
    assert model.blocks[0].mlp.fc1.bias.abs().max() == 0
    assert load_encoder("random:vit_small").info.fingerprint != fingerprint("random:vit_small")


def test_random_is_deterministic_and_any_size():
    a, b = load_encoder("random:vit_tiny_patch8"), load_encoder("random:vit_tiny_patch8")
    assert a.info.arch == "vit_tiny_patch8" and a.info.source == ""
    assert a.info.fingerprint == b.info.fingerprint
    assert a.info.fingerprint != fingerprint("random:vit_tiny_patch16")
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        fa, fb = a.forward_features(x, 3, (0, -1)), b.forward_features(x, 3, (0, -1))
    torch.testing.assert_close(fa["cls"], fb["cls"])
    assert fa["cls_last_n"].shape == (2, 3 * 192)
    torch.testing.assert_close(fa["cls_last_n"][:, -192:], fa["cls"])  # oldest first
    assert [m.shape for m in fa["maps"]] == [(2, 192, 3, 5)] * 2
    with pytest.raises(UserError, match="divisible.*e.g. 32 or 40"):  # patch 8
        a.forward_features(torch.randn(1, 3, 30, 34))
    with pytest.raises(UserError, match=r"e\.g\. 8 \("):  # one size only, not "8 or 8"
        a.forward_features(torch.randn(1, 3, 4, 4))
    with pytest.raises(UserError, match="unknown architecture"):
        load_encoder("random:vit_huge")


def test_pos_embed_interpolation(ckpt_dir, nets):
    """A new input size uses DINO's bicubic offset interpolation of the trained grid."""
    enc = load_encoder(f"ibot:{ckpt_dir / 'flat.pth'}")
    x = torch.randn(2, 3, 48, 40)
    src = nets["teacher"]
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)

    def run_with(patch_pos: torch.Tensor) -> torch.Tensor:
        ref = VisionTransformer(
            img_size=(48, 40), patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=3
        )
        sd = dict(src.state_dict())
        sd["pos_embed"] = torch.cat([src.pos_embed[:, :1], patch_pos.flatten(2).transpose(1, 2)], 1)
        ref.load_state_dict(sd, strict=False)
        return reference(ref.eval(), x, ())["cls"]

    with torch.no_grad():
        got = enc.forward_features(x, dense_blocks=(1,))
        scale = ((6 + 0.1) / 4, (5 + 0.1) / 4)
        want = run_with(F.interpolate(grid, scale_factor=scale, mode="bicubic"))
        padded = run_with(F.pad(grid, (0, 1, 0, 2)))
    assert got["maps"][0].shape == (2, DIM, 6, 5)
    torch.testing.assert_close(got["cls"], want, rtol=1e-5, atol=1e-5)
    assert (got["cls"] - padded).abs().max() > 1e-3
    # exact-size mode equals timm's resampling to the target grid
    enc.model.pos_embed_interp = "exact_size"
    with torch.no_grad():
        exact = enc(x)
        resampled = resample_abs_pos_embed(src.pos_embed, new_size=[6, 5], num_prefix_tokens=1)
        want_exact = run_with(resampled[:, 1:].transpose(1, 2).reshape(1, DIM, 6, 5))
    torch.testing.assert_close(exact, want_exact, rtol=1e-5, atol=1e-5)


def test_fingerprint_changes_with_weights(tmp_path, nets):
    path = tmp_path / "w.pth"
    torch.save(nets["teacher"].state_dict(), path)
    fp1 = load_encoder(f"ibot:{path}").info.fingerprint
    n = len(_HASH_CACHE)
    assert load_encoder(f"ibot:{path}").info.fingerprint == fp1 and len(_HASH_CACHE) == n
    assert load_encoder(f"dino:{path}").info.fingerprint != fp1  # spec is part of it
    torch.save(nets["student"].state_dict(), path)
    assert load_encoder(f"ibot:{path}").info.fingerprint != fp1


def test_timm_cnn_from_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": timm.create_model("resnet18").state_dict()}, path)  # with fc
    enc = load_encoder(f"timm:resnet18:{path}")
    assert (enc.embed_dim, enc.patch_size) == (512, 32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc.forward_features(x, dense_blocks=(1, 4))
    assert out["cls"].shape == out["patch_mean"].shape == out["cls_last_n"].shape == (2, 512)
    assert [m.shape for m in out["maps"]] == [(2, 64, 16, 16), (2, 512, 2, 2)]
    assert enc.info.extra["ignored_keys"] == ["fc.weight", "fc.bias"]
    with pytest.raises(UserError, match="n_last_blocks"):
        enc.forward_features(x, n_last_blocks=2)
    with pytest.raises(UserError, match="out of range"):
        enc.forward_features(x, dense_blocks=(5,))
    # no CLS token: pooled features only, no last-blocks CLS by default, no dense adapter
    assert not (enc.cls_token or enc.block_features or enc.plain_vit)
    assert enc.default_last_blocks() == 0 and enc.layout()["cls"].startswith("pooled")
    with torch.no_grad():
        assert enc.forward_features(x, n_last_blocks=0)["cls_last_n"].shape == (2, 0)
    with pytest.raises(NotApplicableError, match="plain ViT"):
        enc.require_plain_vit("segmentation")


@pytest.mark.parametrize("window", [7, 14])
def test_timm_swin_in_the_official_layout(tmp_path, window):
    """iBOT's Swin-T releases (windows 7 and 14) keep the official Swin layout (a stage's
    downsampling at its end, the classifier as ``head``) inside an iBOT checkpoint; timm's
    own converter maps it, and the window comes from the weights."""
    model = timm.create_model("swin_tiny_patch4_window7_224", window_size=window).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    official = {}
    for key, value in model.state_dict().items():
        stage = key.split(".")[1] if key.startswith("layers.") else None
        if stage is not None and ".downsample." in key:
            key = key.replace(f"layers.{stage}.", f"layers.{int(stage) - 1}.", 1)
        official[key.replace("head.fc.", "head.")] = value
    assert "layers.0.downsample.reduction.weight" in official
    path = tmp_path / "ibot_swin.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, path)
    enc = load_encoder(f"timm:swin_tiny_patch4_window7_224:{path}")
    assert enc.info.extra["converted_by"].endswith("swin_transformer.checkpoint_filter_fn")
    assert enc.info.extra.get("window_size", 7) == window
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(enc.forward_features(x)["cls"], expected)
    with pytest.raises(CheckpointError, match="timm:swin_tiny_patch4_window7_224:PATH"):
        load_encoder(f"ibot:{path}")


def test_timm_pretrained_only_from_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="offline.*timm:resnet18:/path/to/weights"):
        load_encoder("timm:resnet18")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth"
    cached.parent.mkdir(parents=True)
    torch.save(timm.create_model("resnet18").state_dict(), cached)
    enc = load_encoder("timm:resnet18")
    assert enc.info.source == str(cached) and enc.embed_dim == 512


def test_wrong_architecture(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"do not match.*missing.*unexpected"):
        load_encoder(f"timm:resnet18:{ckpt_dir / 'flat.pth'}")
    with pytest.raises(CheckpointError, match="shape mismatch: patch_embed.proj.weight"):
        load_encoder(f"timm:vit_tiny_patch16_224:{ckpt_dir / 'flat.pth'}")
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError, match="timm:NAME:PATH"):
        load_encoder(f"ibot:{path}")
    # DINO's ResNet-50 release: torchvision keys, named as such
    resnet50 = {f"layer3.{i}.conv1.weight": torch.zeros(1) for i in range(6)}
    torch.save({**resnet50, "layer4.0.conv3.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="timm:resnet50:PATH"):
        load_encoder(f"dino:{path}")


def test_heads_of_a_custom_width_are_never_guessed(tmp_path):
    """Width 32 with 2 heads: the shapes are those of 1 head, so the count must be read."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(32, 2, 2, patch_size=PATCH, img_size=IMG)).eval()
    exported = export_backbone(tmp_path / "teacher_backbone.safetensors", vit)
    enc = load_encoder(f"ibot:{exported}")
    assert enc.model.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(enc(X), vit.forward_head(vit.forward_features(X), True))
    bare = tmp_path / "bare.pth"
    torch.save(vit.state_dict(), bare)
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(bare))}: the number of attention heads of this width-32 ViT",
    ):
        load_encoder(f"ibot:{bare}")
    torch.save({"state_dict": vit.state_dict(), "args": {"num_heads": 2}}, bare)
    assert load_encoder(f"ibot:{bare}").model.blocks[0].attn.num_heads == 2


def test_partial_load(tmp_path, nets, capsys):
    sd = dict(nets["teacher"].state_dict())
    del sd["blocks.1.mlp.fc2.weight"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing: blocks.1.mlp.fc2.weight.*1 unexpected"):
        load_encoder(f"ibot:{path}")
    enc = load_encoder(f"ibot:{path}", allow_partial=True)
    assert enc.info.extra["partial"]
    assert "blocks.1.mlp.fc2.weight" in capsys.readouterr().err


def test_read_errors(tmp_path, ckpt_dir):
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(f"ibot:{tmp_path / 'nope.pth'}")
    for name in ("checkpoint.pth", "flat.safetensors"):
        data = (ckpt_dir / name).read_bytes()
        bad = tmp_path / f"trunc_{name}"
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_encoder(f"ibot:{bad}")
    (tmp_path / "text.pth").write_text("a text file renamed .pth")
    with pytest.raises(CheckpointError, match=r"text.pth is not a PyTorch checkpoint .* b'a '"):
        load_encoder(f"ibot:{tmp_path / 'text.pth'}")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="run is a folder with no weights file"):
        load_encoder(f"ibot:{run}")
    (run / "checkpoint.pth").write_bytes((ckpt_dir / "checkpoint.pth").read_bytes())
    (run / "log.jsonl").write_text("{}")
    with pytest.raises(
        CheckpointError, match=f"holds checkpoint.pth. Did you mean {run}/checkpoint"
    ):
        load_encoder(f"ibot:{run}")
    with pytest.raises(CheckpointError, match=f"Did you mean ibot:{run}/checkpoint.pth:student"):
        encoder_fingerprint(f"ibot:{run}:student")  # what eval and run check first
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_encoder(f"ibot:{tmp_path / 'list.pth'}")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_encoder(f"ibot:{tmp_path / 'meta.pth'}")
    with pytest.raises(CheckpointError, match="drop ':student'"):
        load_encoder(f"ibot:{ckpt_dir / 'flat.pth'}:student")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_new_pickle_protocol_is_named_not_corrupt(tmp_path, nets):
    path = tmp_path / "proto4.pth"
    torch.save(nets["teacher"].state_dict(), path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match=r"proto4.pth was pickled with protocol 4") as err:
        load_encoder(f"ibot:{path}")
    assert "corrupt" not in str(err.value)


def test_pickled_code_refused(tmp_path, nets):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": nets["teacher"].state_dict(), "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"Evil.*never runs pickled code.*\['state_dict'\]"):
        load_encoder(f"ibot:{path}")
    torch.save(nets["teacher"], path)  # a whole model: its state_dict() is the fix
    with pytest.raises(CheckpointError, match=r"weights_only=False\)\.state_dict\(\)`, then"):
        load_encoder(f"ibot:{path}")


def test_spec_errors():
    assert {"random", "ibot", "dino", "timm"} <= set(ENCODERS.names())
    with pytest.raises(UserError, match="unknown encoder scheme 'ibt'.*'ibot'"):
        load_encoder("ibt:/x.pth")
    with pytest.raises(UserError, match="SCHEME"):
        load_encoder("checkpoint.pth")
    with pytest.raises(UserError, match="resnet18"):
        load_encoder("timm:resnet18x")
    # timm's hf-hub: names would download; the timm-hosted ones have a cache-reading twin
    with pytest.raises(UserError, match=r"use timm:vit_small_patch16_224\.augreg_in21k, which"):
        encoder_fingerprint("timm:hf-hub:timm/vit_small_patch16_224.augreg_in21k")
    with pytest.raises(UserError, match="not read: use timm:ARCH:PATH"):
        load_encoder("timm:hf-hub:facebook/some-vit:weights.pth")
