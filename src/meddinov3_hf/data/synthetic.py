"""Synthetic, anatomy-like CT volumes and nnU-Net-format datasets for tests and the `meddinov3 demo`.

The phantom is deliberately simple but not trivial: organs differ in intensity *and* in shape/position, so a
model must use context as well as HU to separate e.g. liver (105 HU) from spleen (120 HU). Intensities follow a
portal-venous contrast phase, the usual protocol of abdominal segmentation datasets (AMOS, BTCV, KiTS, LiTS). Everything is
generated from one seed, so a (shape, spacing, seed) triple always gives the same volume.

Array convention (same as `meddinov3_hf.volumes.io`): (Z, Y, X) in the canonical LPS-like orientation,
X right→left, Y anterior→posterior, Z inferior→superior; axial slices are `hu[z]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from ..files import atomic_path

__all__ = [
    "SYNTHETIC_ORGANS",
    "CANONICAL_AXCODES",
    "make_synthetic_ct",
    "synthetic_label_map",
    "canonical_affine",
    "write_nnunet_dataset",
]

CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 700.0


@dataclass(frozen=True)
class _Organ:
    """An organ ellipsoid in body-normalised coordinates.

    u: left-right position in units of the body's lateral semi-axis (-1 = patient's right edge, since X
    runs right→left); v: antero-posterior position in units of the AP semi-axis (-1 = anterior);
    t: cranio-caudal position in units of half the volume height (-1 = inferior).
    """

    name: str
    hu: float
    centre_uvt: tuple[float, float, float]
    semi_axes_uvt: tuple[float, float, float]
    mirrored_pair: bool = False  # kidneys: one ellipsoid on each side
    cortex_hu: float | None = None  # bright rim (renal cortex)


# Order defines label ids (1..n). Chosen to be separable by intensity and/or shape/position.
SYNTHETIC_ORGANS: tuple[_Organ, ...] = (
    _Organ("liver", 105.0, (-0.40, -0.05, 0.25), (0.42, 0.45, 0.60)),
    _Organ("kidney", 160.0, (0.42, 0.55, -0.15), (0.13, 0.16, 0.35), mirrored_pair=True, cortex_hu=200.0),
    _Organ("spleen", 120.0, (0.55, 0.25, 0.35), (0.17, 0.25, 0.35)),
    _Organ("aorta", 170.0, (0.05, 0.30, 0.0), (0.07, 0.07, 1.5)),
    _Organ("bladder", 5.0, (0.0, -0.30, -0.80), (0.22, 0.22, 0.22)),
)


def synthetic_label_map(n_organs: int = 3) -> dict[str, int]:
    """nnU-Net style `labels` mapping name → id for the first `n_organs` synthetic organs."""
    _check_n_organs(n_organs)
    return {"background": 0, **{o.name: i + 1 for i, o in enumerate(SYNTHETIC_ORGANS[:n_organs])}}


def _check_n_organs(n_organs: int) -> None:
    if not 0 <= n_organs <= len(SYNTHETIC_ORGANS):
        raise ValueError(f"n_organs must be in [0, {len(SYNTHETIC_ORGANS)}], got {n_organs}")


def _paint_organs(
    img: np.ndarray,
    labels: np.ndarray,
    uvt: tuple[np.ndarray, np.ndarray, np.ndarray],
    body: np.ndarray,
    n_organs: int,
    rng: np.random.Generator,
) -> None:
    """Paint the first `n_organs` organ ellipsoids (jittered by `rng`) into `img` (HU) and `labels`, in place;
    `uvt` are the body-relative coordinates (broadcastable to the volume)."""
    u, v, t = uvt
    for label_id, organ in enumerate(SYNTHETIC_ORGANS[:n_organs], start=1):
        jitter_c = rng.uniform(-0.06, 0.06, size=3)
        jitter_s = rng.uniform(0.85, 1.15, size=3)
        cu, cv, ct = (c + j for c, j in zip(organ.centre_uvt, jitter_c))
        su, sv, st = (s * j for s, j in zip(organ.semi_axes_uvt, jitter_s))
        centres_u = (cu, -cu) if organ.mirrored_pair else (cu,)
        for cu_i in centres_u:
            d2 = ((u - cu_i) / su) ** 2 + ((v - cv) / sv) ** 2 + ((t - ct) / st) ** 2
            mask = (d2 <= 1.0) & body
            img[mask] = organ.hu
            if organ.cortex_hu is not None:
                img[mask & (d2 >= 0.55)] = organ.cortex_hu
            labels[mask] = label_id


def make_synthetic_ct(
    shape: Sequence[int] = (32, 64, 64),
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    n_organs: int = 3,
    noise_sd: float = 18.0,
    smooth_sigma: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic abdominal CT and its organ labels.

    Args:
        shape: (Z, Y, X) voxels.
        spacing: (sz, sy, sx) mm. Only used to keep the body physically round when sy != sx.
        seed: all randomness (position/size jitter, noise) derives from it.
        n_organs: number of labelled organs, the first `n_organs` of `SYNTHETIC_ORGANS`.
        noise_sd: Gaussian noise standard deviation in HU.
        smooth_sigma: in-plane Gaussian smoothing (voxels) applied before the noise (partial-volume edges).

    Returns:
        hu: int16 (Z, Y, X) Hounsfield units; labels: uint8 (Z, Y, X) with ids per `synthetic_label_map`.
    """
    _check_n_organs(n_organs)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints (Z, Y, X), got {tuple(shape)}")
    nz, ny, nx = (int(s) for s in shape)
    _, sy, sx = (float(s) for s in spacing)
    rng = np.random.default_rng(seed)

    # Physical in-plane coordinates (mm) relative to the field-of-view centre; z normalised to [-1, 1].
    fov_y, fov_x = ny * sy, nx * sx
    y = ((np.arange(ny, dtype=np.float32) + 0.5) * sy - fov_y / 2)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) + 0.5) * sx - fov_x / 2)[None, None, :]
    t = (((np.arange(nz, dtype=np.float32) + 0.5) / nz) * 2 - 1)[:, None, None]

    # Body ellipse; semi-axes in mm from the smaller FOV side so the body fits with some air around it.
    fov = min(fov_x, fov_y)
    ax = fov * 0.42 * rng.uniform(0.9, 1.05)
    ay = fov * 0.32 * rng.uniform(0.9, 1.05)
    cx, cy = rng.uniform(-0.03, 0.03) * fov, rng.uniform(-0.03, 0.03) * fov
    # Body tapers slightly towards the top/bottom of the volume (3-D shape, not a prism).
    taper = 1.0 - 0.08 * t**2
    u = (x - cx) / (ax * taper)  # -1 at patient's right edge (low X index)
    v = (y - cy) / (ay * taper)  # -1 anterior
    r2 = u**2 + v**2

    img = np.full((nz, ny, nx), AIR_HU, dtype=np.float32)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    body = r2 <= 1.0
    img[body] = FAT_HU
    img[r2 <= (0.88 * rng.uniform(0.97, 1.03)) ** 2] = SOFT_TISSUE_HU  # subcutaneous fat ring outside

    _paint_organs(img, labels, (u, v, t), body, n_organs, rng)

    # Spine: a bone cylinder (unlabelled, i.e. background) posterior in the midline, with a darker core.
    su_spine, sv_spine = 0.11 * rng.uniform(0.9, 1.1), 0.14 * rng.uniform(0.9, 1.1)
    d2 = (u / su_spine) ** 2 + ((v - 0.72) / sv_spine) ** 2
    spine = np.broadcast_to(d2 <= 1.0, img.shape)
    img[spine] = BONE_HU
    img[np.broadcast_to(d2 <= 0.35, img.shape)] = 250.0  # cancellous bone
    labels[spine] = 0

    if smooth_sigma > 0:
        # In-plane only: cheap, and slices stay independent like real reconstruction kernels.
        img = ndimage.gaussian_filter(img, sigma=(0.0, smooth_sigma, smooth_sigma), mode="nearest")
    if noise_sd > 0:
        img += rng.normal(0.0, noise_sd, size=img.shape).astype(np.float32)
    hu = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    return hu, labels


def canonical_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """NIfTI (RAS world) affine of a canonical (Z, Y, X) array stored as (X, Y, Z) with LPS-like axes.

    Voxel index i (X) increases to patient-left (world -x), j (Y) to posterior (world -y), k (Z) superior.
    The volume is centred on the world origin.
    """
    nz, ny, nx = shape
    sz, sy, sx = (float(s) for s in spacing)
    aff = np.diag([-sx, -sy, sz, 1.0])
    aff[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
    return aff


def _to_nifti(array_zyx: np.ndarray, spacing: Sequence[float], axcodes: Sequence[str]) -> nib.Nifti1Image:
    """Wrap a canonical (Z, Y, X) array as a NIfTI image whose on-disk voxel axes follow `axcodes`."""
    data_xyz = np.ascontiguousarray(array_zyx.transpose(2, 1, 0))
    img = nib.Nifti1Image(data_xyz, canonical_affine(array_zyx.shape, spacing))
    transform = ornt.ornt_transform(ornt.axcodes2ornt(CANONICAL_AXCODES), ornt.axcodes2ornt(tuple(axcodes)))
    img = img.as_reoriented(transform)  # same physical image, different storage order
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(array_zyx.dtype)
    return img


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as tmp:  # keeps the ".nii.gz" suffix, so nibabel gzips
        nib.save(img, tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _parse_axcodes(affine_kind: str | Sequence[str]) -> tuple[str, str, str]:
    codes = (
        tuple(affine_kind.upper()) if isinstance(affine_kind, str) else tuple(c.upper() for c in affine_kind)
    )
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    if len(codes) != 3 or sorted(next(i for i, p in enumerate(pairs) if c in p) for c in codes) != [0, 1, 2]:
        raise ValueError(
            f"affine_kind must be 3 axis codes using each of L/R, A/P, S/I once, got {affine_kind!r}"
        )
    return codes  # type: ignore[return-value]


def write_nnunet_dataset(
    root: str | os.PathLike,
    n_cases: int = 4,
    shape: Sequence[int] = (32, 64, 64),
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    affine_kind: str | Sequence[str] = "LPS",
    n_organs: int = 3,
    case_prefix: str = "case",
) -> Path:
    """Write a synthetic nnU-Net raw dataset (imagesTr/, labelsTr/, dataset.json) and return its root.

    Args:
        affine_kind: on-disk voxel-axis orientation, e.g. "LPS" (already canonical), "RAS" (X and Y
            flipped on disk) or a permutation such as "PLS"; the physical image is identical, so a
            correct reader returns the same canonical arrays for every kind.
        seed: case i uses seed `seed * 1000 + i`.

    Files: `imagesTr/{case}_0000.nii.gz` (int16 HU), `labelsTr/{case}.nii.gz` (uint8).
    """
    axcodes = _parse_axcodes(affine_kind)
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        case = f"{case_prefix}_{i:03d}"
        hu, labels = make_synthetic_ct(shape, spacing, seed=seed * 1000 + i, n_organs=n_organs)
        _atomic_save(_to_nifti(hu, spacing, axcodes), root / "imagesTr" / f"{case}_0000.nii.gz")
        _atomic_save(_to_nifti(labels, spacing, axcodes), root / "labelsTr" / f"{case}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": synthetic_label_map(n_organs),
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "MedDINOv3Synthetic",
        "description": "Synthetic anatomy-like CT phantoms (meddinov3_hf.data.synthetic)",
    }
    _atomic_write_text(json.dumps(dataset_json, indent=2) + "\n", root / "dataset.json")
    return root
