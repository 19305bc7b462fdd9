"""Shared fixtures: tiny random MedDINOv3 configurations and reference-format checkpoints built in the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ViTModel

import meddinov3_hf  # noqa: F401  (registers the Auto classes and pipelines)
from meddinov3_hf import MedDINOv3Config

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    aggregation_layers=[0, 1, 2, 3],
    decoder_hidden_sizes=[32, 16, 16, 8],
    layerscale_value=1.0,  # so that every block visibly changes the output
)
LABELS = {0: "background", 1: "liver", 2: "kidney"}


def tiny_config(**overrides) -> MedDINOv3Config:
    kwargs = dict(TINY, id2label=LABELS) | overrides
    return MedDINOv3Config(**kwargs)


def reference_dinov3(config: MedDINOv3Config, seed: int = 0, **overrides) -> DINOv3ViTModel:
    """transformers' own DINOv3 ViT with the same architecture, random weights (the parity reference)."""
    torch.manual_seed(seed)
    model = DINOv3ViTModel(config.to_dinov3_vit_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial tokens and biases so that mapping mistakes show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "token" in name:
                param.normal_(0, 0.1)
    return model


def to_reference_names(
    hf_state: dict[str, torch.Tensor],
    num_layers: int,
    query_value_bias: bool = False,
    num_heads: int | None = None,
) -> dict:
    """transformers DINOv3 names → the reference implementation's names (an independent inverse mapping)."""
    ref = {
        "cls_token": hf_state["embeddings.cls_token"],
        "storage_tokens": hf_state["embeddings.register_tokens"],
        "mask_token": hf_state["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.bias"],
        "norm.weight": hf_state["norm.weight"],
        "norm.bias": hf_state["norm.bias"],
    }
    head_dim = hf_state["model.layer.0.attention.q_proj.weight"].shape[0]
    for i in range(num_layers):
        p, b = f"model.layer.{i}.", f"blocks.{i}."
        ref[b + "attn.qkv.weight"] = torch.cat([hf_state[p + f"attention.{x}_proj.weight"] for x in "qkv"])
        if query_value_bias:
            q, v = hf_state[p + "attention.q_proj.bias"], hf_state[p + "attention.v_proj.bias"]
            junk_k = torch.full_like(q, 7.0)  # masked out by bias_mask, as in Meta's checkpoints
            ref[b + "attn.qkv.bias"] = torch.cat([q, junk_k, v])
            ref[b + "attn.qkv.bias_mask"] = torch.cat(
                [torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)]
            )
        for ours, theirs in [
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attention.o_proj", "attn.proj"),
            ("mlp.up_proj", "mlp.fc1"),
            ("mlp.down_proj", "mlp.fc2"),
        ]:
            ref[f"{b}{theirs}.weight"] = hf_state[f"{p}{ours}.weight"]
            ref[f"{b}{theirs}.bias"] = hf_state[f"{p}{ours}.bias"]
        ref[b + "ls1.gamma"] = hf_state[p + "layer_scale1.lambda1"]
        ref[b + "ls2.gamma"] = hf_state[p + "layer_scale2.lambda1"]
    if num_heads is not None:  # the reference stores its RoPE periods (bf16) as a buffer
        d = head_dim // num_heads
        ref["rope_embed.periods"] = 100.0 ** (2 * torch.arange(d // 4, dtype=torch.bfloat16) / (d // 2))
    return ref


def dino_head_state(
    prefix: str, in_dim: int, hidden: int = 48, bottleneck: int = 16, prototypes: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A pretraining head as in DINOv3's dinov3/layers/dino_head.py (tiny sizes; the release uses
    in→2048→2048→256, GELU, L2-normalise, then a bias-free `last_layer` to the prototypes, no weight norm):
    `mlp.0/2/4` Linear layers and `last_layer.weight`, keys prefixed `prefix` (`dino_head.` / `ibot_head.`)."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(in_dim, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, bottleneck),
    )
    last_layer = torch.nn.Linear(bottleneck, prototypes, bias=False)
    state = {f"mlp.{k}": v for k, v in mlp.state_dict().items()} | {"last_layer.weight": last_layer.weight}
    return {prefix + k: v.detach().clone() for k, v in state.items()}


def release_checkpoint(config: MedDINOv3Config, seed: int = 0) -> tuple[DINOv3ViTModel, dict]:
    """A MedDINOv3-release-format training checkpoint ({"teacher": backbone.* + dino_head.* + ibot_head.*}) of
    a random DINOv3 ViT, and that ViT as transformers' `DINOv3ViTModel` (the parity reference)."""
    reference = reference_dinov3(config, seed=seed)
    sd = to_reference_names(
        reference.state_dict(), config.num_hidden_layers, num_heads=config.num_attention_heads
    )
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher |= dino_head_state("dino_head.", config.hidden_size, seed=seed + 1)
    teacher |= dino_head_state("ibot_head.", config.hidden_size, seed=seed + 2)
    return reference, {"teacher": teacher, "iteration": 5}


@pytest.fixture
def tiny() -> MedDINOv3Config:
    return tiny_config()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random segmentation model folder (32 px tiles, 1 mm working spacing), one per test module."""
    from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor

    folder = tmp_path_factory.mktemp("seg-model")
    torch.manual_seed(0)
    MedDINOv3ForSemanticSegmentation(tiny_config(image_size=32)).save_pretrained(folder)
    MedDINOv3ImageProcessor(target_spacing=[1.0, 1.0]).save_pretrained(folder)
    return folder


# Prepended to a subprocess script: `import meddinov3_hf` fails there, as for a user without the package.
BLOCK_PACKAGE_IMPORT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "meddinov3_hf":
            raise ImportError("meddinov3_hf is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import meddinov3_hf
    raise SystemExit("the block did not work")
except ImportError:
    pass
"""
