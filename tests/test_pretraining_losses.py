"""Pretraining losses against slow re-derivations from docs/method.md §7 (DINOv3's `dinov3/loss/`) and
hand-computed cases."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from meddinov3_hf.pretraining.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    resize_patch_features,
    sinkhorn_knopp,
)

# ---------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def naive_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """docs/method.md §7 literally, in float64, no max subtraction, one process."""
    q = torch.exp(logits.double() / temp).t()  # (K, N)
    k, n = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def test_sinkhorn_matches_spec_steps_at_small_logits():
    logits = torch.randn(37, 19, generator=torch.Generator().manual_seed(0))
    for temp, n_it in [(0.1, 3), (0.07, 3), (1.0, 1), (0.04, 5)]:
        ours = sinkhorn_knopp(logits, temp, n_iterations=n_it)
        torch.testing.assert_close(ours.double(), naive_sinkhorn(logits, temp, n_it), rtol=1e-4, atol=1e-6)


def test_sinkhorn_hand_computed_one_iteration():
    # exp(T/τ) with τ = 1: sample 1 → [2, 1], sample 2 → [1, 1]. Per-prototype normalisation gives
    # prototype 1: [2/3, 1/3], prototype 2: [1/2, 1/2]; per-sample normalisation then gives
    # sample 1: [4/7, 3/7], sample 2: [2/5, 3/5].
    logits = torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    expected = torch.tensor([[4 / 7, 3 / 7], [2 / 5, 3 / 5]])
    torch.testing.assert_close(sinkhorn_knopp(logits, 1.0, n_iterations=1), expected)


def test_sinkhorn_rows_sum_to_one_and_prototypes_balance():
    m, k = 256, 16
    logits = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 0.2
    targets = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(m))
    cols = targets.sum(dim=0)
    # After 3 iterations the prototype masses are close to M/K, far closer than a plain softmax's.
    softmax_cols = F.softmax(logits / 0.1, dim=-1).sum(dim=0)
    assert (cols - m / k).abs().max() < 0.1 * m / k
    assert (cols - m / k).abs().max() < 0.25 * (softmax_cols - m / k).abs().max()
    # With many iterations the balance is essentially exact.
    cols_converged = sinkhorn_knopp(logits, 0.1, n_iterations=200).sum(dim=0)
    torch.testing.assert_close(cols_converged, torch.full((k,), m / k), rtol=1e-3, atol=0)


def test_sinkhorn_large_logits_do_not_overflow():
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)) * 50.0
    assert not torch.isfinite(naive_sinkhorn(logits.float(), 0.04).float()).all()  # the literal form fails
    targets = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
    # bf16 input is accepted and computed in fp32.
    assert sinkhorn_knopp(logits.bfloat16(), 0.04).dtype == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_worker(
    rank: int, world: int, port: int, shards: list[list[torch.Tensor]], out_dir: str
) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [sinkhorn_knopp(case[rank], 0.04, n_iterations=3) for case in shards]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_two_processes_equal_single_process(tmp_path):
    gen = torch.Generator().manual_seed(3)
    full_even = torch.randn(32, 24, generator=gen)  # DINO: equal shards
    full_uneven = torch.randn(21, 24, generator=gen)  # iBOT: masked-patch counts differ per process
    full_empty = torch.randn(9, 24, generator=gen)  # iBOT: no masked patch on rank 1
    cases = [(full_even, 16), (full_uneven, 5), (full_empty, 9)]
    shards = [[full[:cut], full[cut:]] for full, cut in cases]
    # spawn, not fork: forking a process whose torch/OpenMP thread pools already ran can deadlock.
    args = (2, _free_port(), shards, str(tmp_path))
    mp.start_processes(_sinkhorn_worker, args=args, nprocs=2, join=True, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, (full, cut) in enumerate(cases):
        combined = torch.cat([per_rank[0][i], per_rank[1][i]])
        assert per_rank[1][i].shape[0] == full.shape[0] - cut
        torch.testing.assert_close(combined, sinkhorn_knopp(full, 0.04, n_iterations=3), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# DINO


def slow_dino(student: torch.Tensor, teacher: torch.Tensor, student_temp: float) -> dict[str, float]:
    """Explicit loops over crop pairs and images."""
    n_g, batch, _ = teacher.shape
    n_l = student.shape[0] - n_g
    local_terms, global_terms = [], []
    for s in range(n_g + n_l):
        for t in range(n_g):
            if s == t:
                continue
            ce = 0.0
            for b in range(batch):
                log_p = F.log_softmax(student[s, b].double() / student_temp, dim=-1)
                ce += -(teacher[t, b].double() * log_p).sum().item()
            (local_terms if s >= n_g else global_terms).append(ce / batch)
    local = sum(local_terms) / len(local_terms) if local_terms else 0.0
    glob = sum(global_terms) / len(global_terms) if global_terms else 0.0
    p = n_g * (n_g - 1) + n_g * n_l
    return {"loss": (n_g * n_l / p) * local + (n_g * (n_g - 1) / p) * glob, "local": local, "global": glob}


def test_dino_loss_hand_computed_g2_l2():
    # τ_s = 1, so student probabilities are softmax(logits) = the probabilities below.
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25]])  # g1, g2, l1, l2
    student = torch.log(probs)[:, None, :]  # (4, B=1, K=2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, None, :]  # t1, t2
    # global pairs: (g1, t2) = ln 2, (g2, t1) = −ln 0.25 = 2 ln 2 → mean 1.5 ln 2
    # local pairs: (l1, t1) = (l1, t2) = ln 2, (l2, t1) = −ln 0.75, (l2, t2) = 2 ln 2 → ln 2 + ln(4/3)/4
    # weights: local G·L/(G(G−1)+G·L) = 4/6, global 2/6
    ln2 = math.log(2.0)
    local = ln2 + math.log(4 / 3) / 4
    glob = 1.5 * ln2
    out = DINOLoss(out_dim=2, student_temp=1.0)(student, teacher)
    assert out["local"].item() == pytest.approx(local, rel=1e-6)
    assert out["global"].item() == pytest.approx(glob, rel=1e-6)
    assert out["loss"].item() == pytest.approx(7 / 6 * ln2 + math.log(4 / 3) / 6, rel=1e-6)


@pytest.mark.parametrize("n_g,n_l", [(2, 8), (2, 3), (2, 0), (1, 4), (3, 2)])
def test_dino_loss_matches_slow_reference(n_g, n_l):
    gen = torch.Generator().manual_seed(n_g * 10 + n_l)
    batch, k = 3, 11
    student = torch.randn(n_g + n_l, batch, k, generator=gen) * 3
    teacher = F.softmax(torch.randn(n_g, batch, k, generator=gen) * 2, dim=-1)
    out = DINOLoss(out_dim=k)(student, teacher)
    ref = slow_dino(student, teacher, 0.1)
    for key in ("loss", "local", "global"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-6)
    if n_g == 2 and n_l == 8:  # docs/method.md §7: 16/18 and 2/18
        expected = 16 / 18 * out["local"] + 2 / 18 * out["global"]
        torch.testing.assert_close(out["loss"], expected)


def test_dino_loss_accepts_lists_bf16_and_backpropagates():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(4, 2, 7, generator=gen).requires_grad_()
    teacher = F.softmax(torch.randn(2, 2, 7, generator=gen), dim=-1)
    loss_fn = DINOLoss(out_dim=7)
    stacked = loss_fn(student, teacher)["loss"]
    listed = loss_fn(list(student.unbind(0)), teacher)["loss"]
    torch.testing.assert_close(stacked, listed)
    stacked.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    bf16 = loss_fn(student.detach().bfloat16(), teacher.bfloat16())["loss"]
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(stacked.item(), rel=2e-2)


def test_dino_loss_without_any_pair_is_zero():
    out = DINOLoss(out_dim=3)(torch.randn(1, 2, 3), F.softmax(torch.randn(1, 2, 3), dim=-1))
    assert out["loss"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# iBOT


def slow_ibot(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, temp: float) -> float:
    total, row = 0.0, 0
    for image in range(masks.shape[0]):
        n_masked = int(masks[image].sum())
        for _ in range(n_masked):
            log_p = F.log_softmax(student[row].double() / temp, dim=-1)
            total += -(teacher[row].double() * log_p).sum().item() / n_masked
            row += 1
    return total / masks.shape[0]


def test_ibot_matches_slow_reference():
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(6, 16, generator=gen) < 0.3
    masks[2] = False  # an unmasked image
    n, k = int(masks.sum()), 9
    student = torch.randn(n, k, generator=gen) * 2
    teacher = F.softmax(torch.randn(n, k, generator=gen), dim=-1)
    out = iBOTPatchLoss(out_dim=k)(student, teacher, masks)
    assert out.item() == pytest.approx(slow_ibot(student, teacher, masks, 0.1), rel=1e-5)


def test_ibot_per_image_normalisation():
    k = 4
    masks = torch.zeros(3, 20, dtype=torch.bool)
    masks[0, 5] = True  # image 0: 1 masked patch
    masks[1, :10] = True  # image 1: 10 masked patches
    # image 2: no mask → contributes zero but still counts in the G·B denominator
    teacher = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(11, k)
    student = torch.zeros(11, k)
    student[0] = torch.tensor([math.log(0.5), math.log(0.5 / 3), math.log(0.5 / 3), math.log(0.5 / 3)])
    loss_fn = iBOTPatchLoss(out_dim=k, student_temp=1.0)
    # CE of image 0's patch: −ln 0.5; image 1's patches: −ln 0.25 each (uniform), averaged → −ln 0.25.
    expected = (math.log(2.0) + math.log(4.0)) / 3
    assert loss_fn(student, teacher, masks).item() == pytest.approx(expected, rel=1e-6)
    # Same CE everywhere: the 1-patch image weighs exactly as much as the 10-patch image.
    uniform = torch.zeros(11, k)
    assert loss_fn(uniform, teacher, masks).item() == pytest.approx(2 * math.log(4.0) / 3, rel=1e-6)


def test_ibot_without_masked_patches_is_zero():
    masks = torch.zeros(4, 9, dtype=torch.bool)
    out = iBOTPatchLoss(out_dim=5)(torch.zeros(0, 5), torch.zeros(0, 5), masks)
    assert out.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# KoLeo


def slow_koleo(x: torch.Tensor) -> float:
    z = [v / v.norm() for v in x.double()]
    total = 0.0
    for i, zi in enumerate(z):
        best_j = max((j for j in range(len(z)) if j != i), key=lambda j: float(zi @ z[j]))
        total += -math.log(float((zi - z[best_j] + 1e-8).norm()) + 1e-8)  # nn.PairwiseDistance(eps=1e-8)
    return total / len(z)


def test_koleo_on_circle_known_geometry():
    degrees = torch.tensor([0.0, 10.0, 100.0, 200.0])
    rad = torch.deg2rad(degrees)
    x = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1) * 5.0  # radius is irrelevant after normalising
    # nearest neighbours: 0↔10 (10°), 10→0 (10°), 100→10 (90°), 200→100 (100°); chord = 2 sin(θ/2)
    chords = [2 * math.sin(math.radians(a) / 2) for a in (10, 10, 90, 100)]
    expected = -sum(math.log(c + 1e-8) for c in chords) / 4
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)
    # Square: every neighbour at 90° → d = √2.
    sq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert KoLeoLoss()(sq).item() == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-5)


def test_koleo_identical_rows_match_reference_pairwise_distance():
    # dinov3/loss/koleo_loss.py: nn.PairwiseDistance(2, eps=1e-8) computes ||a - b + eps||, so identical rows
    # are at distance sqrt(D)·1e-8, not 0: loss = -log(sqrt(D)·1e-8 + 1e-8).
    d = 16
    x = torch.ones(2, d)
    reference_distance = torch.nn.PairwiseDistance(2, eps=1e-8)(x[:1] / 4, x[:1] / 4).item()
    expected = -math.log(math.sqrt(d) * 1e-8 + 1e-8)
    assert reference_distance == pytest.approx(math.sqrt(d) * 1e-8)
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_matches_slow_reference_and_has_gradients():
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(7)).requires_grad_()
    out = KoLeoLoss()(x)
    assert out.item() == pytest.approx(slow_koleo(x.detach()), rel=1e-5)
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Gram


def slow_gram(s: torch.Tensor, t: torch.Tensor, remove_negatives: bool, per_image: bool) -> float:
    if not per_image:
        s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                gs = float(F.cosine_similarity(s[b, i].double(), s[b, j].double(), dim=0))
                gt = float(F.cosine_similarity(t[b, i].double(), t[b, j].double(), dim=0))
                if remove_negatives:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


def test_gram_zero_for_identical_and_per_token_scaled_features():
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(2, 6, 5, generator=gen)
    scale = torch.rand(2, 6, 1, generator=gen) * 10 + 0.1
    for per_image in (True, False):
        loss = GramLoss(per_image=per_image)
        assert loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-10)
        assert loss(feats * scale, feats).item() == pytest.approx(0.0, abs=1e-10)


def test_gram_hand_computed_two_tokens_and_negative_clipping():
    # student tokens e1, e2 → G_s = I; teacher e1, (e1+e2)/√2 → off-diagonal 1/√2.
    # mean of squared differences = 2 · (1/√2)² / 4 = 0.25
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert GramLoss()(student, teacher).item() == pytest.approx(0.25, rel=1e-6)
    # Opposite student tokens: G_s off-diagonal −1 vs teacher 0 → 2 · 1 / 4 = 0.5; clipped → 0.
    student_neg = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    teacher_orth = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert GramLoss()(student_neg, teacher_orth).item() == pytest.approx(0.5, rel=1e-6)
    assert GramLoss(remove_negatives=True)(student_neg, teacher_orth).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("remove_negatives", [False, True])
@pytest.mark.parametrize("per_image", [True, False])
def test_gram_matches_slow_reference(remove_negatives, per_image):
    gen = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    out = GramLoss(remove_negatives=remove_negatives, per_image=per_image)(s, t)
    assert out.item() == pytest.approx(slow_gram(s, t, remove_negatives, per_image), rel=1e-5)


def test_gram_teacher_gets_no_gradient():
    s = torch.randn(1, 4, 3).requires_grad_()
    t = torch.randn(1, 4, 3).requires_grad_()
    GramLoss()(s.bfloat16(), t).backward()
    assert s.grad is not None and t.grad is None


def test_resize_patch_features():
    gen = torch.Generator().manual_seed(10)
    b, d, (h1, w1), (h2, w2) = 2, 3, (8, 6), (4, 3)
    grid = torch.randn(b, d, h1, w1, generator=gen)
    tokens = grid.flatten(2).transpose(1, 2)  # (B, h·w, D), row-major
    out = resize_patch_features(tokens, (h1, w1), (h2, w2))
    # DINOv3 resizes the Gram teacher's patch map without antialiasing (global_teacher_resize_antialias: false).
    expected = F.interpolate(grid, size=(h2, w2), mode="bicubic", align_corners=False, antialias=False)
    assert out.shape == (b, h2 * w2, d)
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2))
    const = torch.full((1, h1 * w1, d), 0.7)
    torch.testing.assert_close(
        resize_patch_features(const, (h1, w1), (h2, w2)), torch.full((1, h2 * w2, d), 0.7)
    )
    assert resize_patch_features(tokens, (h1, w1), (h1, w1)) is tokens
    with pytest.raises(ValueError):
        resize_patch_features(tokens, (5, 5), (h2, w2))


def test_losses_stay_fp32_under_autocast():
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(4, 8, 256, generator=gen) * 3
    teacher = F.softmax(torch.randn(2, 8, 256, generator=gen), dim=-1)
    feats_s, feats_t = torch.randn(2, 16, 32, generator=gen), torch.randn(2, 16, 32, generator=gen)
    cls = torch.randn(8, 32, generator=gen)
    cases = [
        lambda: DINOLoss(256)(student, teacher)["loss"],
        lambda: GramLoss()(feats_s, feats_t),
        lambda: KoLeoLoss()(cls),
        lambda: sinkhorn_knopp(student[0], 0.04),
    ]
    for fn in cases:
        ref = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = fn()
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, ref, rtol=1e-5, atol=1e-6)
