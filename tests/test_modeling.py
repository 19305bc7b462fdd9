"""MedDINOv3 models: parity with transformers' DINOv3, reference RoPE numerics, the segmentation head, Auto classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, reference_dinov3, tiny_config, to_reference_names
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForSemanticSegmentation,
    DINOv3ViTBackbone,
)

from meddinov3_hf import MedDINOv3Backbone, MedDINOv3Config, MedDINOv3ForSemanticSegmentation, MedDINOv3Model
from meddinov3_hf.modeling_meddinov3 import MedDINOv3Decoder, segmentation_loss


def _ours_from_reference(config, reference) -> MedDINOv3Model:
    model = MedDINOv3Model(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


# -- reference-style ViT, written from the description of the reference implementation -------------------------
def reference_vit_forward(sd: dict, x: torch.Tensor, num_heads: int, eps: float, rope_dtype: torch.dtype):
    """A direct re-derivation of the reference DINOv3 ViT forward from its state dict (reference key names):
    RoPE periods/coords/angles/sin/cos in `rope_dtype`, q and k (all tokens) cast to it around the rotation."""
    patch = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    b, d, h, w = patch.shape
    tokens = torch.cat(
        [
            sd["cls_token"].expand(b, -1, -1),
            sd["storage_tokens"].expand(b, -1, -1),
            patch.flatten(2).transpose(1, 2),
        ],
        dim=1,
    )
    hd = d // num_heads
    dd = {"dtype": rope_dtype}
    periods = 100.0 ** (2 * torch.arange(hd // 4, **dd) / (hd // 2))
    coords = torch.stack(
        torch.meshgrid(torch.arange(0.5, h, **dd) / h, torch.arange(0.5, w, **dd) / w, indexing="ij"), dim=-1
    ).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = torch.sin(angles), torch.cos(angles)

    def rope(t):
        dtype = t.dtype
        t = t.to(rope_dtype)
        prefix, p = t[:, :, : -h * w], t[:, :, -h * w :]
        p1, p2 = p.chunk(2, dim=-1)
        p = p * cos + torch.cat([-p2, p1], dim=-1) * sin
        return torch.cat([prefix, p], dim=2).to(dtype)

    n = tokens.shape[1]
    blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(blocks):
        p = f"blocks.{i}."
        y = F.layer_norm(tokens, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"]).reshape(b, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = rope(qkv[0]), rope(qkv[1]), qkv[2]
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        tokens = tokens + sd[p + "ls1.gamma"] * F.linear(
            attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        y = F.layer_norm(tokens, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        y = F.linear(
            F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        tokens = tokens + sd[p + "ls2.gamma"] * y
    return F.layer_norm(tokens, (d,), sd["norm.weight"], sd["norm.bias"], eps)


def test_default_config_is_the_paper_backbone():
    config = MedDINOv3Config()
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    ) == (768, 12, 12, 3072)
    assert config.patch_size == 16 and config.num_register_tokens == 4 and config.layer_norm_eps == 1e-6
    assert not (config.query_bias or config.key_bias or config.value_bias)
    assert config.layerscale_value == 1e-5 and config.rope_theta == 100.0 and config.pos_embed_rescale is None
    assert config.aggregation_layers == [2, 5, 8, 11] and config.decoder_hidden_sizes == [1536, 768, 384, 192]
    assert config.out_features == ["stage3", "stage6", "stage9", "stage12"]
    assert not config.use_gated_mlp and config.hidden_act == "gelu"


def test_config_rejects_an_unknown_rope_precision():
    with pytest.raises(Exception, match="rope_precision"):
        tiny_config(rope_precision="fp16")


@pytest.mark.parametrize(
    "bad", [dict(aggregation_layers=[0, 9]), dict(aggregation_layers=[]), dict(decoder_hidden_sizes=[8, 8])]
)
def test_head_fields_are_validated_where_the_head_is_built(bad):
    # Head fields do not concern the backbone classes (transformers' DINOv3 configs must build them) ...
    config = tiny_config(**bad)
    MedDINOv3Model(config)
    MedDINOv3Backbone(config)
    # ... but the segmentation head refuses them, naming the field.
    with pytest.raises(ValueError, match="aggregation_layers|decoder_hidden_sizes"):
        MedDINOv3ForSemanticSegmentation(config)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (32, 16)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_backbone_matches_transformers_dinov3(size, attn):
    config = tiny_config()
    config._attn_implementation = attn
    reference = reference_dinov3(config)
    reference.config._attn_implementation = attn
    ours = _ours_from_reference(config, reference)
    x = torch.randn(2, 3, *size)
    mask = torch.rand(2, (size[0] // 16) * (size[1] // 16)) < 0.3
    with torch.no_grad():
        a = ours(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=attn == "eager")
        b = reference(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=attn == "eager")
    assert a.last_hidden_state.shape == (2, 1 + 4 + (size[0] // 16) * (size[1] // 16), 32)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == 5
    if attn == "eager":
        assert len(a.attentions) == 4
        torch.testing.assert_close(a.attentions[-1], b.attentions[-1], atol=1e-5, rtol=0)


def test_feature_maps_match_dinov3_backbone_and_intermediate_layers():
    config = tiny_config(aggregation_layers=[1, 3])
    reference = reference_dinov3(config)
    ref_backbone = DINOv3ViTBackbone(config.to_dinov3_vit_config(out_indices=[2, 4])).eval()
    ref_backbone.load_state_dict(reference.state_dict())
    ours = MedDINOv3Backbone(config).eval()
    ours.load_state_dict(reference.state_dict())
    model = _ours_from_reference(config, reference)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        mine, theirs = ours(x).feature_maps, ref_backbone(x).feature_maps
        direct = model.get_intermediate_layers(x, [1, 3])
    assert [f.shape for f in mine] == [(2, 32, 4, 3)] * 2
    for a, b, c in zip(mine, theirs, direct):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_single_channel_input_equals_repeated_channel():
    config = tiny_config()
    model = _ours_from_reference(config, reference_dinov3(config))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).last_hidden_state, model(x.repeat(1, 3, 1, 1)).last_hidden_state, atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 2, 32, 32))


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_rope_modes_reproduce_reference_numerics(precision, dtype):
    config = tiny_config(rope_precision=precision, layer_norm_eps=1e-6)
    reference = reference_dinov3(config)
    model = _ours_from_reference(config, reference)
    sd = to_reference_names(
        reference.state_dict(), config.num_hidden_layers, num_heads=config.num_attention_heads
    )
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ours = model(x).last_hidden_state
        expected = reference_vit_forward(sd, x, config.num_attention_heads, 1e-6, dtype)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)


def test_bf16_rope_differs_measurably_from_fp32():
    fp32 = tiny_config(rope_precision="fp32")
    reference = reference_dinov3(fp32)
    with torch.no_grad():  # trained ViTs have peaked attention; std-0.02 init makes q·k (and RoPE) irrelevant
        for layer in reference.model.layer:
            layer.attention.q_proj.weight.mul_(30)
            layer.attention.k_proj.weight.mul_(30)
    a = _ours_from_reference(fp32, reference)
    b = _ours_from_reference(tiny_config(rope_precision="bf16"), reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a(x).last_hidden_state, b(x).last_hidden_state
    relative = ((ya - yb).norm() / ya.norm()).item()
    assert 1e-5 < relative < 5e-2  # bf16 rounding of q/k: visible, but small


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config()
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(config).train()
    x, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    model(x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "meddinov3.embeddings.mask_token" not in plain and len(plain) > 40
    model.zero_grad()
    model.activation_checkpointing_enable() if hasattr(
        model, "activation_checkpointing_enable"
    ) else model.gradient_checkpointing_enable()
    assert (
        model.meddinov3.model.layer[0].gradient_checkpointing
        and model.decoder.stages[0].gradient_checkpointing
    )
    model(x, labels=labels).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


# -- segmentation head ----------------------------------------------------------------------------------------
def reference_decoder(decoder: MedDINOv3Decoder, features: torch.Tensor) -> torch.Tensor:
    """The straightforward NCHW decoder: ConvTranspose2d → channel LayerNorm → GELU, then a 1×1 conv."""
    x = features
    for stage in decoder.stages:
        x = stage.upsample(x)
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), x.shape[1:2], stage.norm.weight, stage.norm.bias, stage.norm.eps
        )
        x = F.gelu(x.permute(0, 3, 1, 2))
    return decoder.classifier(x)


def test_token_layout_decoder_equals_transposed_convolutions():
    config = tiny_config()
    decoder = MedDINOv3ForSemanticSegmentation(config).decoder
    with torch.no_grad():
        for stage in decoder.stages:
            stage.norm.weight.normal_(1, 0.2)
            stage.norm.bias.normal_(0, 0.2)
            stage.upsample.bias.normal_(0, 0.2)
    features = torch.randn(2, 32 * 4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            decoder(features), reference_decoder(decoder, features), atol=1e-5, rtol=1e-5
        )


def test_segmentation_forward_uses_the_aggregated_blocks():
    config = tiny_config(aggregation_layers=[0, 2])
    model = MedDINOv3ForSemanticSegmentation(config).eval()
    x = torch.randn(2, 1, 48, 32)
    with torch.no_grad():
        out = model(x)
        features = model.meddinov3.get_intermediate_layers(x, [0, 2])
        expected = reference_decoder(model.decoder, torch.cat(features, dim=1))
    assert out.logits.shape == (2, 3, 48, 32)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.loss is None
    assert model(x, return_dict=False)[0].shape == (2, 3, 48, 32)


def test_decoder_init_is_he_normal_with_zero_bias():
    decoder = MedDINOv3ForSemanticSegmentation(tiny_config(decoder_hidden_sizes=[256, 256, 256, 256])).decoder
    weight = decoder.stages[1].upsample.weight  # (C_in, C_out, 2, 2); torch's fan_in is C_out·4
    expected_std = math.sqrt(2 / (1 + 1e-4)) / math.sqrt(weight.shape[1] * 4)
    assert abs(weight.std().item() - expected_std) / expected_std < 0.05
    assert all(stage.upsample.bias.abs().max() == 0 for stage in decoder.stages)
    assert decoder.classifier.bias.abs().max() == 0
    classifier_std = math.sqrt(2 / (1 + 1e-4)) / math.sqrt(decoder.classifier.weight.shape[1])
    assert abs(decoder.classifier.weight.std().item() - classifier_std) / classifier_std < 0.1


def test_loss_is_dice_plus_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :2] = 255
    valid = labels != 255
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    probs = logits.softmax(1)
    dices = []
    for c in (1, 2):
        p, g = probs[:, c][valid], (labels[valid] == c).float()
        dices.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    expected = ce + 1 - torch.stack(dices).mean()
    torch.testing.assert_close(segmentation_loss(logits, labels, ignore_index=255), expected)
    perfect = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert segmentation_loss(perfect, labels) < 1e-3


def test_loss_rejects_out_of_range_labels_and_bad_shapes():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="outside"):
        segmentation_loss(logits, torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="outside"):
        segmentation_loss(logits, torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="shape"):
        segmentation_loss(logits, torch.zeros(1, 4, 5, dtype=torch.long))


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config()).train()
    x = torch.randn(4, 1, 32, 32)
    labels = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.5).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    "bad", [torch.randn(1, 32, 32), torch.randn(1, 1, 30, 32), torch.randn(1, 1, 32, 40)]
)
def test_bad_pixel_values_raise_clear_errors(bad):
    model = MedDINOv3ForSemanticSegmentation(tiny_config()).eval()
    with pytest.raises(ValueError, match="4-D|multiples of the patch size"):
        model(bad)


# -- save / load through the Auto classes ---------------------------------------------------------------------
def test_round_trips_through_every_auto_class(tmp_path):
    config = tiny_config()
    model = MedDINOv3ForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MedDINOv3Config)
    x = torch.randn(1, 1, 32, 48)
    seg, info = AutoModelForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert seg.config.id2label == LABELS
    backbone, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(backbone, MedDINOv3Model) and not info["missing_keys"]
    feature_backbone = MedDINOv3Backbone.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(seg(x).logits, model(x).logits)
        torch.testing.assert_close(backbone(x).last_hidden_state, model.meddinov3(x).last_hidden_state)
        maps = feature_backbone(x).feature_maps
        torch.testing.assert_close(
            torch.cat(maps, 1), torch.cat(model.meddinov3.get_intermediate_layers(x, [0, 1, 2, 3]), 1)
        )
    # a backbone folder → a segmentation model with a fresh decoder and the same encoder
    backbone.save_pretrained(tmp_path / "backbone")
    fresh, info = AutoModelForSemanticSegmentation.from_pretrained(
        tmp_path / "backbone", num_labels=5, output_loading_info=True
    )
    assert all(k.startswith("decoder.") for k in info["missing_keys"]) and info["missing_keys"]
    torch.testing.assert_close(fresh.meddinov3.norm.weight, model.meddinov3.norm.weight)
    assert fresh.decoder.classifier.out_channels == 5


def test_auto_backbone_class_is_registered():
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    assert MODEL_FOR_BACKBONE_MAPPING[MedDINOv3Config] is MedDINOv3Backbone
    backbone = AutoBackbone.from_config(tiny_config())
    assert isinstance(backbone, MedDINOv3Backbone) and backbone.out_features == [
        "stage1",
        "stage2",
        "stage3",
        "stage4",
    ]


def test_transformers_upernet_head_uses_the_backbone(tmp_path):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    config = UperNetConfig(
        backbone_config=tiny_config(), num_labels=3, hidden_size=32, use_auxiliary_head=False
    )
    model = UperNetForSemanticSegmentation(config).eval()
    assert isinstance(model.backbone, MedDINOv3Backbone)
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (1, 3, 64, 48)
    model.save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, logits)
