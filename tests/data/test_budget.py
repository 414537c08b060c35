"""Annotation budgets, boxes and counterexamples (sib.data.budget) on the real built-in datasets."""

from __future__ import annotations

import pytest
import torch

from sib.data import collate, create_dataset
from sib.data.budget import TrainingAnnotations, box_of, replace_background


def _synthetic(n=24, **options):
    return create_dataset("synthetic", None, "train", num_samples=n, image_size=32, **options)


def test_counterexamples_keep_the_object_and_take_another_images_background():
    ds = _synthetic()
    cx = TrainingAnnotations(ds, counterexamples=0.5, seed=3)
    assert len(cx.partner) == 12 and all(i != j for i, j in cx.partner.items())
    for i in range(len(ds)):
        x, y, m = ds[i]
        xc, yc, mc = cx[i]
        assert yc == y and torch.equal(mc, m)  # label and mask are the image's own
        if i not in cx.partner:
            assert torch.equal(xc, x)
            continue
        xj, _, mj = ds[cx.partner[i]]
        assert torch.equal(xc[:, m[0]], x[:, m[0]])  # the object is untouched
        free = ~m[0] & ~mj[0]  # background of both: the partner's background
        assert torch.equal(xc[:, free], xj[:, free])
        hole = ~m[0] & mj[0]  # the partner's object: its mean background colour
        if hole.any():
            mean = xj[:, ~mj[0]].mean(dim=1)
            torch.testing.assert_close(xc[:, hole], mean[:, None].expand(-1, int(hole.sum())))


def test_counterexamples_randomise_the_synthetic_shortcut():
    """Backgrounds come from uniformly drawn partners: on swapped images the background family no longer
    follows the label (rho 0.9 in the source)."""
    ds = _synthetic(n=600)
    cx = TrainingAnnotations(ds, counterexamples=1.0, seed=0)
    agree = sum(ds.background_family(j) == ds.label(i) for i, j in cx.partner.items()) / len(cx.partner)
    assert agree < 0.35  # 0.9 before; 0.9 / 6 + 0.1 * (5/6) / 5 ~ 0.17 expected for a uniform partner


def test_mask_fraction_keeps_a_fixed_seeded_subset():
    ds = _synthetic(n=40)
    a = TrainingAnnotations(ds, mask_fraction=0.1, seed=1)
    b = TrainingAnnotations(ds, mask_fraction=0.1, seed=1)
    c = TrainingAnnotations(ds, mask_fraction=0.1, seed=2)
    kept = [i for i in range(40) if a[i][2].any()]
    assert len(kept) == 4 and kept == [i for i in range(40) if b[i][2].any()]
    assert kept != [i for i in range(40) if c[i][2].any()]
    assert all(torch.equal(a[i][2], ds[i][2]) for i in kept)
    x, y, mask = collate([a[i] for i in range(8)])  # unannotated images carry empty masks
    assert mask is not None and int(mask.flatten(1).any(1).sum()) == sum(a.annotated[:8])
    # a batch of unannotated images only still has a mask tensor (the regulariser then adds 0, no error)
    none = [i for i in range(40) if not a.annotated[i]][:4]
    assert collate([a[i] for i in none])[2] is not None
    assert TrainingAnnotations(ds, mask_fraction=0.001, seed=0).annotated.sum() == 1  # never none


def test_boxes_are_the_masks_bounding_boxes():
    m = torch.zeros(1, 10, 12, dtype=torch.bool)
    m[0, 2, 3] = m[0, 6, 9] = m[0, 4, 5] = True
    box = box_of(m)
    expected = torch.zeros_like(m)
    expected[0, 2:7, 3:10] = True
    assert torch.equal(box, expected)
    assert not box_of(torch.zeros_like(m)).any()
    ds = _synthetic(n=6)
    boxed = TrainingAnnotations(ds, annotation="box")
    for i in range(6):
        _, _, mb = boxed[i]
        assert torch.equal(mb, box_of(ds[i][2])) and mb.sum() >= ds[i][2].sum()


def test_wrapper_forwards_the_dataset_attributes():
    ds = _synthetic(n=6)
    w = TrainingAnnotations(ds, counterexamples=0.5)
    assert (w.num_classes, w.classes, w.has_masks, len(w)) == (ds.num_classes, ds.classes, True, 6)


@pytest.mark.parametrize("kwargs,message", [
    ({"counterexamples": 1.5}, r"--counterexamples 1.5: must be a share in \[0, 1\]"),
    ({"mask_fraction": 0.0}, r"--reg-mask-fraction 0.0: must be a share in \(0, 1\]"),
    ({"annotation": "polygon"}, "--reg-annotation 'polygon': valid values are mask, box"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingAnnotations(_synthetic(n=4), **kwargs)


def test_counterexamples_without_masks_name_the_image():
    class NoMasks(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), 0, None

    with pytest.raises(ValueError, match="training image [0-3] .* has no mask"):
        TrainingAnnotations(NoMasks(), counterexamples=1.0)[0]


def test_replace_background_of_an_image_without_background_uses_its_mean():
    x = torch.zeros(3, 2, 2)
    other = torch.arange(12.0).view(3, 2, 2)
    mask = torch.tensor([[[True, False], [False, False]]])
    out = replace_background(x, mask, other, torch.ones(1, 2, 2, dtype=torch.bool))
    assert torch.equal(out[:, 0, 0], x[:, 0, 0])
    torch.testing.assert_close(out[:, 1, 1], other.flatten(1).mean(dim=1))


def test_train_rho_unconfounds_the_training_split_only():
    train = create_dataset("synthetic", None, "train", num_samples=600, image_size=32, train_rho=1 / 6)
    val = create_dataset("synthetic", None, "val", num_samples=600, image_size=32, train_rho=1 / 6)
    agree = lambda d: sum(d.background_family(i) == d.label(i) for i in range(len(d))) / len(d)  # noqa: E731
    assert agree(train) < 0.25 and agree(val) > 0.8
