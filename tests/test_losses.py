"""Losses agree with direct references and handle missing labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from bigmodel.config import (
    ClassificationHeadConfig,
    ConfigError,
    RetrievalHeadConfig,
    SegmentationHeadConfig,
)
from bigmodel.tasks.losses import (
    ClassificationLoss,
    RetrievalLoss,
    SegmentationLoss,
    soft_dice_loss,
    softmax_focal_loss,
)


def test_multiclass_masks_unknown_and_absent_samples():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    target = torch.tensor([0, 2, -1, 1, 1, 0])
    has = torch.tensor([True, True, True, True, False, True])
    cfg = ClassificationHeadConfig(num_classes=3, label_smoothing=0.1, class_weights=[1, 2, 3])
    loss = ClassificationLoss(cfg)(logits, target, has)
    keep = torch.tensor([0, 1, 3, 5])
    expected = F.cross_entropy(
        logits[keep], target[keep], weight=torch.tensor([1.0, 2, 3]), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)


def test_no_label_gives_none():
    cfg = ClassificationHeadConfig(num_classes=3)
    assert ClassificationLoss(cfg)(torch.randn(2, 3), torch.tensor([-1, -1])) is None
    ml = ClassificationHeadConfig(num_classes=3, multilabel=True)
    assert ClassificationLoss(ml)(torch.randn(2, 3), torch.full((2, 3), -1.0)) is None
    seg = SegmentationLoss(SegmentationHeadConfig(num_classes=2))
    assert seg(torch.randn(2, 2, 4, 4), torch.full((2, 4, 4), 255)) is None
    assert (
        seg(torch.randn(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2).bool())
        is None
    )


def test_multilabel_bce_averages_known_entries_only():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    target = torch.tensor([[1, 0, -1], [0, -1, -1], [1, 1, 0], [-1, -1, -1]], dtype=torch.float32)
    loss = ClassificationLoss(ClassificationHeadConfig(num_classes=3, multilabel=True))(
        logits, target
    )
    known = target >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], target[known])
    torch.testing.assert_close(loss, expected)
    focal = ClassificationLoss(ClassificationHeadConfig(num_classes=3, multilabel=True, focal=True))
    expected_focal = sigmoid_focal_loss(logits, target.clamp(min=0), alpha=-1, reduction="none")
    torch.testing.assert_close(focal(logits, target), expected_focal[known].mean())


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_samples():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(
        softmax_focal_loss(logits, target, gamma=0.0),
        F.cross_entropy(logits, target, reduction="none"),
    )
    easy = torch.tensor([[8.0, 0.0, 0.0]])
    ratio = softmax_focal_loss(easy, torch.tensor([0]), 2.0) / F.cross_entropy(
        easy, torch.tensor([0])
    )
    assert ratio < 1e-3


def test_class_weights_length_is_checked():
    with pytest.raises(ConfigError, match="one weight per class"):
        ClassificationLoss(ClassificationHeadConfig(num_classes=3, class_weights=[1.0, 2.0]))


def test_dice_matches_numpy_definition_and_skips_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    probs = logits.softmax(1).numpy()
    valid = (target != 255).numpy()
    dices = []
    for k in range(3):
        p = probs[:, k][valid]
        y = (target.numpy()[valid] == k).astype("float32")
        dices.append((2 * (p * y).sum() + 1e-6) / (p.sum() + y.sum() + 1e-6))
    expected = 1 - sum(dices) / 3
    assert abs(soft_dice_loss(logits, target, 255).item() - expected) < 1e-5
    # A confident, correct prediction has (almost) no Dice loss, whatever the ignored pixels say.
    perfect = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    perfect[0, :, :2] = torch.randn(3, 2, 8)
    assert soft_dice_loss(perfect, target, 255).item() < 1e-4


def test_segmentation_loss_is_ce_plus_weighted_dice():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    target[1, 0] = 255
    loss = SegmentationLoss(SegmentationHeadConfig(num_classes=3, dice_weight=0.5))(logits, target)
    expected = F.cross_entropy(logits, target, ignore_index=255) + 0.5 * soft_dice_loss(
        logits, target, 255
    )
    torch.testing.assert_close(loss, expected)


def test_segmentation_mask_size_mismatch_is_explained():
    loss = SegmentationLoss(SegmentationHeadConfig(num_classes=2))
    with pytest.raises(ValueError, match="masks must have the image's size"):
        loss(torch.randn(1, 2, 8, 8), torch.zeros(1, 4, 4, dtype=torch.long))


def test_retrieval_loss_string_labels_and_masking():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(4, 8), dim=1)
    loss = RetrievalLoss(RetrievalHeadConfig(embed_dim=8))
    by_string = loss(emb, ["p1", "p2", "p1", "p2"])
    by_int = loss(emb, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(by_string, by_int)
    assert loss(emb, torch.tensor([0, -1, -1, -1])) is None
    with pytest.raises(ConfigError, match="arcface needs num_classes"):
        RetrievalLoss(RetrievalHeadConfig(embed_dim=8, metric_loss="arcface"))


def test_focal_with_class_weights_is_a_weighted_mean_like_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])
    weights = [0.2, 3.0, 1.5]
    focal = ClassificationHeadConfig(num_classes=3, focal=True, focal_gamma=0.0)
    loss = ClassificationLoss(focal.model_copy(update={"class_weights": weights}))(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights))
    torch.testing.assert_close(loss, expected)


def test_multilabel_pos_weight_scales_only_positives():
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    target = torch.tensor([[1, 0, 0], [0, 0, 1], [0, -1, 0], [1, 0, 0], [0, 1, -1]]).float()
    cfg = ClassificationHeadConfig(num_classes=3, multilabel=True, pos_weight=[4.0, 1.0, 9.0])
    loss = ClassificationLoss(cfg)(logits, target)
    known = target >= 0
    per_entry = F.binary_cross_entropy_with_logits(
        logits, target.clamp(min=0), pos_weight=torch.tensor([4.0, 1.0, 9.0]), reduction="none"
    )
    torch.testing.assert_close(loss, per_entry[known].mean())
    # negatives keep weight 1: a batch without positives is unchanged by pos_weight
    negatives = torch.zeros(5, 3)
    plain = ClassificationLoss(ClassificationHeadConfig(num_classes=3, multilabel=True))
    torch.testing.assert_close(ClassificationLoss(cfg)(logits, negatives), plain(logits, negatives))
    with pytest.raises(ConfigError, match="pos_weight weighs the positive term"):
        ClassificationLoss(ClassificationHeadConfig(num_classes=3, pos_weight=[1.0, 1.0, 1.0]))


def test_string_labels_are_stable_across_batches():
    """Patient ids map to the same integer in any batch (and so on any rank)."""
    from bigmodel.tasks.losses import _labels_as_ints

    first = _labels_as_ints(["p7", "p1", "p7"], torch.device("cpu"))
    second = _labels_as_ints(["p1", "p7"], torch.device("cpu"))
    assert first[0] == first[2] == second[1] and first[1] == second[0] != first[0]
    assert (first >= 0).all()


GATHER_BATCH = 8


def _supcon_setup():
    torch.manual_seed(0)
    projection = torch.nn.Linear(6, 4)
    inputs = torch.randn(GATHER_BATCH, 6)
    labels = [f"p{i % 3}" for i in range(GATHER_BATCH)]
    return projection, inputs, labels


def _supcon_ranks(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    projection, inputs, labels = _supcon_setup()
    share = GATHER_BATCH // world_size
    part = slice(rank * share, (rank + 1) * share)
    loss = RetrievalLoss(RetrievalHeadConfig(embed_dim=4, temperature=0.5))
    value = loss(F.normalize(projection(inputs[part]), dim=1), labels[part])
    value.backward()
    grad = projection.weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: the mean of the ranks' gradients
    if rank == 0:
        torch.save({"loss": value.detach(), "grad": grad / world_size}, out)
    dist.destroy_process_group()


def test_supcon_on_two_ranks_equals_one_rank_with_the_whole_batch(tmp_path):
    """Embeddings are gathered with gradients (open_clip's gather_features): 2 ranks x 4 samples
    give the loss and the gradient of 1 rank x 8, not of two separate halves."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_supcon_ranks, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    projection, inputs, labels = _supcon_setup()
    loss = RetrievalLoss(RetrievalHeadConfig(embed_dim=4, temperature=0.5))
    expected = loss(F.normalize(projection(inputs), dim=1), labels)
    expected.backward()
    torch.testing.assert_close(got["loss"], expected.detach())
    torch.testing.assert_close(got["grad"], projection.weight.grad)
