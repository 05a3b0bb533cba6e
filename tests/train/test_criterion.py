import numpy as np
import torch

from sam3studio.train.criterion import LossWeights, Predictions, category_loss, match, set_criterion
from sam3studio.train.data import PromptTarget

M = 16


def _square_mask(x0, y0, x1, y1):
    mask = np.zeros((M, M), np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def _target(*boxes_px):
    masks = np.stack([_square_mask(*b) for b in boxes_px]) if boxes_px else np.zeros((0, M, M), np.float32)
    boxes = np.asarray([[v / M for v in b] for b in boxes_px], np.float32).reshape(-1, 4)
    return PromptTarget("thing", masks, boxes)


def _predictions(queries=4, layers=2, rows=1):
    """Queries that predict nothing in particular: mid boxes, flat masks, low scores."""
    logits = torch.full((layers, rows, queries), -3.0)
    boxes = torch.tensor([0.3, 0.3, 0.6, 0.6]).repeat(layers, rows, queries, 1)
    masks = torch.full((rows, queries, M, M), -4.0)
    presence = torch.zeros(layers, rows, 1)
    return Predictions(logits, boxes, presence, masks, torch.zeros(rows, 1, M, M))


def _make_query_exact(p: Predictions, row: int, query: int, box_px):
    p.boxes[:, row, query] = torch.tensor([v / M for v in box_px])
    p.masks[row, query] = torch.from_numpy(_square_mask(*box_px)) * 16 - 8
    p.logits[:, row, query] = 4.0


def test_matching_finds_the_query_that_fits():
    target = _target((2, 2, 8, 8), (10, 10, 15, 14))
    p = _predictions()
    _make_query_exact(p, 0, 2, (2, 2, 8, 8))
    _make_query_exact(p, 0, 0, (10, 10, 15, 14))
    queries, targets = match(p.logits[-1, 0], p.boxes[-1, 0], p.masks[0], target, LossWeights())
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 2, 1: 0}


def test_exact_predictions_cost_less_than_wrong_ones():
    target = [_target((2, 2, 8, 8))]
    good, bad = _predictions(), _predictions()
    _make_query_exact(good, 0, 1, (2, 2, 8, 8))
    _make_query_exact(bad, 0, 1, (9, 9, 15, 15))  # a confident query in the wrong place
    good_losses, bad_losses = set_criterion(good, target), set_criterion(bad, target)
    assert good_losses["box_l1"] < 1e-6 and good_losses["box_giou"] < 1e-6
    assert good_losses["mask_dice"] < 0.05 < bad_losses["mask_dice"]
    assert good_losses["total"] < bad_losses["total"]


def test_negative_prompt_trains_scores_and_presence_down():
    p = _predictions()
    p.logits.fill_(3.0)
    p.presence.fill_(3.0)
    p.logits.requires_grad_(True)
    p.presence.requires_grad_(True)
    losses = set_criterion(p, [_target()])
    assert losses["box_l1"] == 0 and losses["mask_dice"] == 0
    losses["total"].backward()
    assert (p.logits.grad > 0).all() and (p.presence.grad > 0).all(), "gradient descent lowers them"


def test_gradients_reach_matched_boxes_and_masks():
    p = _predictions()
    for tensor in (p.boxes, p.masks, p.logits):
        tensor.requires_grad_(True)
    set_criterion(p, [_target((2, 2, 8, 8))])["total"].backward()
    assert p.boxes.grad.abs().sum() > 0 and p.masks.grad.abs().sum() > 0
    matched_rows = (p.masks.grad.abs().sum(dim=(2, 3)) > 0).sum()
    assert matched_rows == 1, "only the matched query's mask is trained"


def test_losses_are_fp32_for_bf16_predictions():
    p = _predictions()
    p = Predictions(*(t.bfloat16() for t in (p.logits, p.boxes, p.presence, p.masks, p.semantic)))
    losses = set_criterion(p, [_target((2, 2, 8, 8))])
    assert all(v.dtype is torch.float32 for v in losses.values())


def test_every_layer_is_matched_on_its_own():
    target = [_target((2, 2, 8, 8))]
    p = _predictions(layers=3)
    _make_query_exact(p, 0, 1, (2, 2, 8, 8))
    p.boxes[0, 0, 1] = torch.tensor([0.9, 0.9, 1.0, 1.0])  # the first layer's query 1 is far off
    p.boxes[0, 0, 3] = torch.tensor([v / M for v in (2, 2, 8, 8)])  # but its query 3 fits
    p.logits[0, 0, 3] = 4.0
    assert set_criterion(p, target)["box_l1"] < 1e-6


def test_query_quality_is_each_querys_best_iou_with_its_prompts_objects():
    from sam3studio.train.criterion import query_quality

    targets = [_target((2, 2, 8, 8), (10, 10, 15, 14)), _target()]
    p = _predictions(rows=2)
    _make_query_exact(p, 0, 1, (2, 2, 8, 8))
    _make_query_exact(p, 0, 3, (10, 10, 15, 12))  # the top 2 of the object's 4 rows: IoU 0.5
    for masks in (p.masks, None):
        quality = query_quality(p.boxes[-1], masks, targets)
        assert quality[0, 1] == 1.0 and abs(quality[0, 3].item() - 0.5) < 1e-6
        assert (quality[1] == 0).all()  # a negative prompt: nothing to be
    assert (query_quality(p.boxes[-1], p.masks, targets)[0, [0, 2]] == 0).all()  # empty masks overlap nothing


def test_quality_targets_reward_scores_that_rank_queries_by_iou():
    target = [_target((2, 2, 8, 8))]
    ranked, inverted = _predictions(), _predictions()
    for p in (ranked, inverted):
        _make_query_exact(p, 0, 1, (2, 2, 8, 8))
        _make_query_exact(p, 0, 2, (2, 2, 8, 5))  # a duplicate covering half the object
    ranked.logits[:, 0, 1], ranked.logits[:, 0, 2] = 4.0, 0.0
    inverted.logits[:, 0, 1], inverted.logits[:, 0, 2] = 0.0, 4.0
    good = set_criterion(ranked, target, quality_targets=True)["classification"]
    bad = set_criterion(inverted, target, quality_targets=True)["classification"]
    assert good < bad
    # One-to-one targets want the duplicate silent; quality targets want it at its IoU, 0.5 (logit 0).
    silent = _predictions()
    _make_query_exact(silent, 0, 1, (2, 2, 8, 8))
    _make_query_exact(silent, 0, 2, (2, 2, 8, 5))
    silent.logits[:, 0, 1], silent.logits[:, 0, 2] = 4.0, -4.0
    assert set_criterion(silent, target)["classification"] < set_criterion(ranked, target)["classification"]
    assert good < set_criterion(silent, target, quality_targets=True)["classification"]


def test_category_loss_weighs_background_pixels_as_asked():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 1:3, 1:3] = 2
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[:, 2] = 5.0  # every pixel called category 2: right on the object, wrong on the background
    plain, light, none = (category_loss(logits, labels, w).item() for w in (1.0, 0.1, 0.0))
    assert plain > 5.0 and none < 1e-3
    per_background_pixel = plain * 16 / 12  # the 4 object pixels cost ~0
    # a weighted mean: 12 background pixels at weight 0.1 against 4 object pixels at 1
    assert abs(light - per_background_pixel * 12 * 0.1 / (12 * 0.1 + 4)) < 1e-3 * plain


def test_position_targets_are_waves_along_x_and_y():
    from sam3studio.train.criterion import POSITION_AMPLITUDE, POSITION_FREQUENCIES, position_targets

    waves = position_targets(16)
    assert waves.shape == (4 * len(POSITION_FREQUENCIES), 16, 16)
    sin_x, sin_y = waves[0], waves[1]
    assert torch.equal(sin_x, sin_x[:1].expand(16, 16)) and torch.equal(sin_y, sin_y[:, :1].expand(16, 16))
    assert torch.allclose(sin_x[0], sin_y[:, 0])
    assert sin_x[0, 3] > 0 > sin_x[0, 12], "one cycle across the image at the lowest frequency"
    assert torch.allclose(waves.abs().amax(), torch.tensor(POSITION_AMPLITUDE), atol=0.01)


def test_position_loss_is_zero_only_when_the_channels_hold_the_position():
    from sam3studio.train.criterion import position_loss, position_targets

    waves = position_targets(12)
    rest = torch.randn(5, 12, 12)
    rest = rest / rest.norm(dim=0) * (1 - (waves**2).sum(0)).sqrt()  # each pixel's whole vector at length 1
    exact = torch.cat([waves, rest])[None].repeat(2, 1, 1, 1)
    assert float(position_loss(exact)) < 1e-10
    assert float(position_loss(exact * 0.001)) < 1e-10, "the features' scale does not matter, only their direction"
    assert float(position_loss(exact.flip(-1))) > 0.01
    assert float(position_loss(torch.randn(2, 17, 12, 12))) > 0.01
    features = exact.flip(-1).clone().requires_grad_()
    position_loss(features).backward()
    assert features.grad[:, : len(waves)].abs().sum() > 0


def _named(name: str, target: PromptTarget) -> PromptTarget:
    return PromptTarget(name, target.masks, target.boxes)


def test_every_name_quality_is_each_querys_iou_with_each_names_objects_whatever_the_prompt():
    from sam3studio.train.criterion import every_name_quality

    square, circle = _target((2, 2, 8, 8)), _target((10, 10, 15, 14))
    image = {"blue square": _named("blue square", square), "square": _named("square", square), "red circle": _named("red circle", circle)}
    names = ["blue square", "red circle", "square", "star"]
    p = _predictions(rows=2)  # two prompts on one image: "square" and the absent "star"
    _make_query_exact(p, 0, 1, (2, 2, 8, 8))
    _make_query_exact(p, 1, 3, (10, 10, 15, 14))
    quality = every_name_quality(p.boxes[-1], p.masks, [image, image], names)
    assert quality.shape == (4, 2, 4)
    assert quality[0, 0, 1] == 1 and quality[2, 0, 1] == 1 and quality[1, 0, 1] == 0  # the square: its two names, not the circle's
    assert quality[1, 1, 3] == 1 and quality[0, 1, 3] == 0  # the circle, found under the "star" prompt, is still a red circle
    assert (quality[3] == 0).all()  # no star in the image


def test_every_name_loss_rewards_scores_that_name_what_each_query_covers():
    from sam3studio.train.criterion import every_name_loss

    square, circle = _target((2, 2, 8, 8)), _target((10, 10, 15, 14))
    image = {"square": _named("square", square), "circle": _named("circle", circle)}
    names = ["square", "circle", "star"]
    p = _predictions()
    _make_query_exact(p, 0, 0, (2, 2, 8, 8))
    _make_query_exact(p, 0, 1, (10, 10, 15, 14))
    p.boxes[:, 0, 2:] = torch.tensor([0.9, 0.9, 1.0, 1.0])  # the other two queries cover nothing, by box as by mask
    right = torch.full((2, 3, 1, 4), -6.0)
    right[:, 0, 0, 0], right[:, 1, 0, 1] = 6.0, 6.0
    swapped = torch.full((2, 3, 1, 4), -6.0)
    swapped[:, 1, 0, 0], swapped[:, 0, 0, 1] = 6.0, 6.0
    swapped.requires_grad_(True)
    good = every_name_loss(right, p.boxes, p.masks, [image], names)
    bad = every_name_loss(swapped, p.boxes, p.masks, [image], names)
    assert good < 0.01 < 1.0 < bad
    bad.backward()
    assert swapped.grad[-1, 1, 0, 0] > 0 and swapped.grad[-1, 0, 0, 0] < 0  # "circle" down, "square" up for the square's query
