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
        source_note="Converted from the MedDINOv3 release (EMA teacher of the CT-3M domain-adaptive "
        "pretraining) with `meddinov3 convert`.",
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
        source_note="Converted from a reference nnU-Net fine-tuning checkpoint (`checkpoint_final.pth`) with "
        "`meddinov3 convert`, or produced by `training/finetune.py`; the evaluation section is filled from "
        "whole-volume validation by the fine-tuning script.",
        training_data="AMOS22 CT (abdominal multi-organ segmentation, 15 organs), nnU-Net raw format, "
        "5-fold cross-validation split.",
    )
)
print("rendered", sorted(p.name for p in HERE.glob("*.md")))
