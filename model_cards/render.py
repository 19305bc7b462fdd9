"""Re-render the example cards in this folder from the package template (src/meddinov3_hf/templates).

python model_cards/render.py
"""

from pathlib import Path

from meddinov3_hf import MedDINOv3Config, MedDINOv3ImageProcessor
from meddinov3_hf.model_card import render_model_card

HERE = Path(__file__).parent

backbone = MedDINOv3Config(rope_precision="bf16", architectures=["MedDINOv3Model"])
(HERE / "meddinov3-vitb.md").write_text(
    render_model_card(
        model_name="meddinov3-vitb",
        config=backbone,
        processor=MedDINOv3ImageProcessor(),
        source_note="Converted from the MedDINOv3 release on the Hugging Face Hub, repo "
        "[`ricklisz123/MedDINOv3-ViTB-16-CT-3M`](https://huggingface.co/ricklisz123/MedDINOv3-ViTB-16-CT-3M), file "
        "`model.pth` (the EMA teacher of the CT-3M domain-adaptive pretraining), with "
        "`meddinov3 convert ricklisz123/MedDINOv3-ViTB-16-CT-3M meddinov3-vitb`.\n\n"
        "Conversion check: the card that `meddinov3 convert` writes into the folder records the source commit and "
        "the checks it ran on that folder: every source tensor placed (0 missing, 0 unexpected), the written "
        "folder reloaded tensor-identical, and the backbone (fp32 RoPE) compared with transformers' "
        "`DINOv3ViTModel` on the same weights (max |Δ| measured, the conversion fails above 1e-4). This example "
        "card was rendered without the release at hand, so it carries no measured value; on synthetic "
        "release-format checkpoints the tests measure max |Δ| ≤ 1e-5. The DINO and iBOT heads are kept with their "
        "original keys in `pretraining_heads.safetensors`. Without this package: "
        "`AutoModel.from_pretrained(repo, trust_remote_code=True)` (the folder carries its model code).",
        training_data="CT-3M: 3.87 M axial CT slices from 16 public CT datasets (Li et al., 2025), starting "
        "from DINOv3 ViT-B/16 (LVD-1689M).",
    )
)
amos_labels = [
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "bladder",
    "prostate/uterus",
]
segmentation = MedDINOv3Config(
    rope_precision="bf16",
    architectures=["MedDINOv3ForSemanticSegmentation"],
    id2label=dict(enumerate(amos_labels)),
)
(HERE / "meddinov3-vitb-amos.md").write_text(
    render_model_card(
        model_name="meddinov3-vitb-amos",
        config=segmentation,
        processor=MedDINOv3ImageProcessor(target_spacing=[0.4464, 0.4464]),
        source_note="Converted from a reference nnU-Net fine-tuning checkpoint (`checkpoint_final.pth`, a local "
        "file: fine-tunes are not on the Hub) with `meddinov3 convert`, or produced by `training/finetune.py`; the "
        "evaluation section is filled from whole-volume validation by the fine-tuning script. `meddinov3 convert` "
        "records its conversion check (all tensors placed, folder reloaded tensor-identical, backbone max |Δ| "
        "against transformers' `DINOv3ViTModel`) in the card of the folder it writes.",
        training_data="AMOS22 CT (abdominal multi-organ segmentation, 15 organs), nnU-Net raw format, "
        "5-fold cross-validation split.",
    )
)
print("rendered", sorted(p.name for p in HERE.glob("*.md")))
