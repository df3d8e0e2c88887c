"""Stage-2 re-balancing head losses checked against their published formulas.

Every reference below is a naive per-sample Python loop written from the paper's formula. It is
generic over the arithmetic: called on Python floats with ``math.exp``/``math.log`` it gives the
reference value (float64); called on 0-d float64 tensors with ``torch.exp``/``torch.log`` it gives
the reference gradient via autograd. Class weights, margins and smoothing factors are recomputed
here from the papers' definitions, not taken from the implementation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from medmetric.lightning_modules.losses.rebalancing import (
    HEAD_LOSSES,
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    FocalLoss,
    HeadLoss,
    LabelAwareSmoothingLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    adjust_logits_post_hoc,
    build_head_loss,
    label_aware_smoothing_factors,
)

COUNTS = [500, 100, 30, 10, 2]
C, N = len(COUNTS), 12
SEEDS = [0, 1, 2]


def batch(seed, n=N, classes=C, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    targets[:classes] = torch.arange(classes)  # every class appears at least once
    return logits, targets


# --- references written from the papers ----------------------------------------------------------
def ref_log_softmax(z, exp, log):
    total = sum(exp(v) for v in z)
    return [v - log(total) for v in z]


def ref_cb_weights(counts, scheme, beta):
    """Cui et al. 2019: w_j = (1 - beta) / (1 - beta^n_j) (or 1 / n_j), normalised to sum C."""
    if scheme == "none":
        return [1.0] * len(counts)
    raw = [1.0 / n if scheme == "inverse" else (1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * r / sum(raw) for r in raw]


def ref_ce(z, y, counts, exp, log, weighting="none", beta=0.999):
    """(1/N) sum_i -w_{y_i} log softmax(z_i)_{y_i}."""
    w = ref_cb_weights(counts, weighting, beta)
    return sum(
        -w[t] * ref_log_softmax(row, exp, log)[t] for row, t in zip(z, y, strict=True)
    ) / len(y)


def ref_logit_adjusted(z, y, counts, exp, log, tau=1.0):
    """Menon et al. 2021, eq. 10: -log softmax(f(x) + tau log pi)_y, pi_j = n_j / sum n."""
    total = sum(counts)
    losses = []
    for row, t in zip(z, y, strict=True):
        adjusted = [row[j] + tau * math.log(counts[j] / total) for j in range(len(row))]
        losses.append(-ref_log_softmax(adjusted, exp, log)[t])
    return sum(losses) / len(losses)


def ref_balanced_softmax(z, y, counts, exp, log):
    """Ren et al. 2020: -log [n_y exp(z_y) / sum_j n_j exp(z_j)]."""
    losses = []
    for row, t in zip(z, y, strict=True):
        denominator = sum(counts[j] * exp(row[j]) for j in range(len(row)))
        losses.append(-log(counts[t] * exp(row[t]) / denominator))
    return sum(losses) / len(losses)


def ref_ldam(z, y, counts, exp, log, max_margin=0.5, scale=30.0, weights=None):
    """Cao et al. 2019: Delta_j ∝ n_j^{-1/4}, max Delta = max_margin;
    -log e^{s(z_y - Delta_y)} / (e^{s(z_y - Delta_y)} + sum_{j != y} e^{s z_j});
    with DRW weights the mean is sum w_y l / sum w_y (F.cross_entropy(weight=w))."""
    raw = [n**-0.25 for n in counts]
    delta = [max_margin * r / max(raw) for r in raw]
    numerator_sum, weight_sum = 0.0, 0.0
    for row, t in zip(z, y, strict=True):
        target_term = exp(scale * (row[t] - delta[t]))
        others = sum(exp(scale * row[j]) for j in range(len(row)) if j != t)
        loss = -log(target_term / (target_term + others))
        w = 1.0 if weights is None else weights[t]
        numerator_sum = numerator_sum + w * loss
        weight_sum += w
    return numerator_sum / weight_sum


def ref_las_factors(counts, head, tail, shape, power=None):
    """Zhong et al. 2021 (MiSLAS), Sec. 3.2: eps_y = f(N_y) between eps_K (tail) and eps_1 (head)."""
    n1, nk = max(counts), min(counts)
    out = []
    for n in counts:
        r = (n - nk) / (n1 - nk)
        if shape == "concave":
            out.append(tail + (head - tail) * math.sin(math.pi * r / 2))
        elif shape == "linear":
            out.append(tail + (head - tail) * r)
        elif shape == "convex":
            out.append(head + (head - tail) * math.sin(1.5 * math.pi + math.pi * r / 2))
        else:
            out.append(tail + (head - tail) * r**power)
    return out


def ref_las(z, y, counts, exp, log, smooth_head=0.3, smooth_tail=0.0, shape="concave", power=None):
    """-sum_j q_j log p_j with q_j = (1 - eps_y)[j = y] + eps_y / C (official MiSLAS code)."""
    eps = ref_las_factors(counts, smooth_head, smooth_tail, shape, power)
    losses = []
    for row, t in zip(z, y, strict=True):
        log_p = ref_log_softmax(row, exp, log)
        c = len(row)
        q = [(1 - eps[t]) * (j == t) + eps[t] / c for j in range(c)]
        losses.append(-sum(q[j] * log_p[j] for j in range(c)))
    return sum(losses) / len(losses)


def ref_focal(z, y, counts, exp, log, gamma=2.0, weighting="none", beta=0.999):
    """Lin et al. 2017, eq. 5: -alpha_t (1 - p_t)^gamma log p_t, mean over the batch."""
    alpha = ref_cb_weights(counts, weighting, beta)
    losses = []
    for row, t in zip(z, y, strict=True):
        log_pt = ref_log_softmax(row, exp, log)[t]
        losses.append(-alpha[t] * (1 - exp(log_pt)) ** gamma * log_pt)
    return sum(losses) / len(losses)


CASES = {
    "ce": ("ce", {}, ref_ce),
    "ce_inverse": ("ce", {"weighting": "inverse"}, ref_ce),
    "ce_class_balanced": ("ce", {"weighting": "effective_number", "beta": 0.99}, ref_ce),
    "logit_adjusted": ("logit_adjusted", {}, ref_logit_adjusted),
    "logit_adjusted_tau_0.5": ("logit_adjusted", {"tau": 0.5}, ref_logit_adjusted),
    "balanced_softmax": ("balanced_softmax", {}, ref_balanced_softmax),
    "ldam": ("ldam", {"scale": 5.0}, ref_ldam),
    "ldam_default_scale": ("ldam", {"max_margin": 0.3}, ref_ldam),
    "las_concave": ("label_aware_smoothing", {}, ref_las),
    "las_linear": ("label_aware_smoothing", {"shape": "linear", "smooth_tail": 0.05}, ref_las),
    "las_convex": ("label_aware_smoothing", {"shape": "convex", "smooth_head": 0.4}, ref_las),
    "las_exp": ("label_aware_smoothing", {"shape": "exp", "power": 2.0}, ref_las),
    "focal": ("focal", {}, ref_focal),
    "focal_gamma_0.5_inverse": ("focal", {"gamma": 0.5, "weighting": "inverse"}, ref_focal),
    "focal_class_balanced": ("focal", {"gamma": 1.0, "weighting": "effective_number"}, ref_focal),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_the_published_formula(case, seed):
    name, kwargs, reference = CASES[case]
    logits, targets = batch(seed)
    y = targets.tolist()

    expected = reference(logits.double().tolist(), y, COUNTS, math.exp, math.log, **kwargs)
    z64 = logits.double().requires_grad_()
    rows = [[z64[i, j] for j in range(C)] for i in range(N)]
    reference(rows, y, COUNTS, torch.exp, torch.log, **kwargs).backward()

    z = logits.clone().requires_grad_()
    loss = build_head_loss(name, COUNTS, **kwargs)(z, targets)
    loss.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_ldam_drw_after_the_switch_matches_the_weighted_formula(seed):
    logits, targets = batch(seed, scale=1.0)
    beta = 0.9999
    weights = ref_cb_weights(COUNTS, "effective_number", beta)
    expected = ref_ldam(
        logits.double().tolist(), targets.tolist(), COUNTS, math.exp, math.log, weights=weights
    )
    z64 = logits.double().requires_grad_()
    rows = [[z64[i, j] for j in range(C)] for i in range(N)]
    ref_ldam(rows, targets.tolist(), COUNTS, torch.exp, torch.log, weights=weights).backward()

    loss_fn = LDAMLoss(COUNTS, drw_epoch=3, beta=beta)
    loss_fn.set_epoch(3)
    z = logits.clone().requires_grad_()
    loss = loss_fn(z, targets)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


def test_ldam_drw_switches_weights_at_drw_epoch():
    logits, targets = batch(0, scale=1.0)
    plain = LDAMLoss(COUNTS)
    deferred = LDAMLoss(COUNTS, drw_epoch=2)
    expected_weights = torch.tensor(
        ref_cb_weights(COUNTS, "effective_number", 0.9999), dtype=torch.float64
    )
    for epoch, active in [(0, False), (1, False), (2, True), (5, True), (1, False)]:
        deferred.set_epoch(epoch)
        assert deferred.drw_active is active
        if active:
            torch.testing.assert_close(
                deferred.current_weights.double(), expected_weights, rtol=1e-6, atol=0
            )
            assert deferred(logits, targets).item() != pytest.approx(
                plain(logits, targets).item(), rel=1e-3
            )
            manual = F.cross_entropy(
                30 * (logits - F.one_hot(targets, C) * deferred.margins[targets][:, None]),
                targets,
                weight=expected_weights.float(),
            )
            assert deferred(logits, targets).item() == pytest.approx(manual.item(), rel=1e-5)
        else:
            assert deferred.current_weights is None
            assert deferred(logits, targets).item() == pytest.approx(
                plain(logits, targets).item(), rel=1e-6
            )
    assert float(expected_weights.sum()) == pytest.approx(C)  # the paper's normalisation


def test_ldam_margins_follow_the_quarter_power_and_max_margin():
    loss_fn = LDAMLoss(COUNTS, max_margin=0.5)
    expected = torch.tensor([n**-0.25 for n in COUNTS], dtype=torch.float64)
    expected = 0.5 * expected / expected.max()
    torch.testing.assert_close(loss_fn.margins.double(), expected, rtol=1e-6, atol=0)
    assert loss_fn.margins.max().item() == pytest.approx(0.5)


# --- hand-computed tiny cases --------------------------------------------------------------------
def test_logit_adjustment_and_balanced_softmax_by_hand():
    counts = [3, 1]  # pi = (3/4, 1/4)
    zero = torch.zeros(2, 2)
    targets = torch.tensor([1, 0])
    # adjusted logits (log 3/4, log 1/4): p = (3/4, 1/4); -log p_1 = log 4, -log p_0 = log 4/3
    expected = (math.log(4) + math.log(4 / 3)) / 2
    assert LogitAdjustedLoss(counts, tau=1.0)(zero, targets).item() == pytest.approx(expected)
    assert BalancedSoftmaxLoss(counts)(zero, targets).item() == pytest.approx(expected)
    # f = (1, 2), y = 1: -log e^2 / (3e + e^2) = log(1 + 3/e)
    f = torch.tensor([[1.0, 2.0]])
    one = torch.tensor([1])
    assert BalancedSoftmaxLoss(counts)(f, one).item() == pytest.approx(math.log(1 + 3 / math.e))
    assert LogitAdjustedLoss(counts)(f, one).item() == pytest.approx(math.log(1 + 3 / math.e))
    # tau = 2: prior ratio squared, -log e^2 / 9e + e^2 = log(1 + 9/e)
    assert LogitAdjustedLoss(counts, tau=2.0)(f, one).item() == pytest.approx(
        math.log(1 + 9 / math.e)
    )


def test_post_hoc_adjustment_by_hand():
    adjusted = adjust_logits_post_hoc(torch.zeros(1, 2), [3, 1], tau=1.0)
    torch.testing.assert_close(adjusted, torch.tensor([[math.log(4 / 3), math.log(4)]]))
    adjusted = adjust_logits_post_hoc(torch.tensor([[1.0, 0.5]]), [3, 1], tau=0.5)
    expected = [1.0 - 0.5 * math.log(0.75), 0.5 - 0.5 * math.log(0.25)]
    assert adjusted[0].tolist() == pytest.approx(expected)
    # the prediction flips to the rare class: balanced-error decision rule (eq. 9)
    assert adjust_logits_post_hoc(torch.tensor([[1.0, 0.5]]), [3, 1]).argmax().item() == 1
    assert (
        adjust_logits_post_hoc(torch.zeros(1, 2, dtype=torch.bfloat16), [3, 1]).dtype
        == torch.float32
    )
    assert torch.isfinite(adjust_logits_post_hoc(torch.zeros(3, 3), [5, 0, 1])).all()
    with pytest.raises(ValueError, match="class_counts"):
        adjust_logits_post_hoc(torch.zeros(1, 3), [3, 1])


# --- equivalences --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_equivalences(seed):
    logits, targets = batch(seed)
    ce = F.cross_entropy(logits, targets).item()
    assert CrossEntropyLoss(COUNTS)(logits, targets).item() == pytest.approx(ce, rel=1e-6)
    assert LogitAdjustedLoss(COUNTS, tau=0.0)(logits, targets).item() == pytest.approx(ce, rel=1e-6)
    assert FocalLoss(COUNTS, gamma=0.0)(logits, targets).item() == pytest.approx(ce, rel=1e-6)
    assert LabelAwareSmoothingLoss(COUNTS, smooth_head=0.0, smooth_tail=0.0)(
        logits, targets
    ).item() == pytest.approx(ce, rel=1e-6)
    la = LogitAdjustedLoss(COUNTS, tau=1.0)(logits, targets).item()
    assert BalancedSoftmaxLoss(COUNTS)(logits, targets).item() == pytest.approx(la, rel=1e-6)
    for weighting in ["inverse", "effective_number"]:
        weighted_ce = CrossEntropyLoss(COUNTS, weighting=weighting)(logits, targets).item()
        assert FocalLoss(COUNTS, gamma=0.0, weighting=weighting)(
            logits, targets
        ).item() == pytest.approx(weighted_ce, rel=1e-6)
    # LDAM with no margin and scale 1 is plain CE
    assert LDAMLoss(COUNTS, max_margin=0.0, scale=1.0)(logits, targets).item() == pytest.approx(
        ce, rel=1e-6
    )
    # uniform label smoothing when every class has the same smoothing factor
    uniform = F.cross_entropy(logits, targets, label_smoothing=0.2).item()
    las = LabelAwareSmoothingLoss(COUNTS, smooth_head=0.2, smooth_tail=0.2)
    assert las(logits, targets).item() == pytest.approx(uniform, rel=1e-6)


def test_set_epoch_is_a_no_op_for_losses_without_a_schedule():
    logits, targets = batch(0)
    for name in HEAD_LOSSES:
        loss_fn = build_head_loss(name, COUNTS)
        before = loss_fn(logits, targets).item()
        loss_fn.set_epoch(100)
        assert loss_fn(logits, targets).item() == before


# --- weights, smoothing factors ------------------------------------------------------------------
def test_class_weights_are_normalised_to_sum_c():
    for weighting in ["inverse", "effective_number"]:
        weights = CrossEntropyLoss(COUNTS, weighting=weighting).class_weights
        expected = ref_cb_weights(COUNTS, weighting, 0.999)
        assert weights.tolist() == pytest.approx(expected, rel=1e-6)
        assert weights.sum().item() == pytest.approx(C)
        assert weights.argmax().item() == C - 1  # rarest class weighs most
    assert CrossEntropyLoss(COUNTS).class_weights is None
    # a class without images: weight 0, the others mean 1 among themselves
    weights = FocalLoss([500, 0, 30], weighting="inverse").class_weights
    assert weights[1] == 0 and weights.sum().item() == pytest.approx(2)


@pytest.mark.parametrize("shape", ["concave", "linear", "convex", "exp"])
def test_label_aware_smoothing_factors_span_tail_to_head(shape):
    power = 2.0 if shape == "exp" else None
    factors = label_aware_smoothing_factors(COUNTS, 0.4, 0.1, shape, power)
    assert factors.tolist() == pytest.approx(ref_las_factors(COUNTS, 0.4, 0.1, shape, power))
    assert factors[0].item() == pytest.approx(0.4) and factors[-1].item() == pytest.approx(0.1)
    assert (factors[:-1] >= factors[1:]).all()  # more images -> more smoothing


def test_label_aware_smoothing_shapes_are_ordered():
    concave, linear, convex = (
        label_aware_smoothing_factors(COUNTS, 0.3, 0.0, s) for s in ["concave", "linear", "convex"]
    )
    assert (concave[1:-1] > linear[1:-1]).all() and (linear[1:-1] > convex[1:-1]).all()
    # all counts equal: every class is a head class
    assert label_aware_smoothing_factors([7, 7, 7], 0.3, 0.0).tolist() == pytest.approx([0.3] * 3)


# --- zero counts, precision, empty batches ----------------------------------------------------------
ALL_CONFIGS = [(case, *CASES[case][:2]) for case in sorted(CASES)] + [
    ("ldam_drw", "ldam", {"drw_epoch": 0}),
]


@pytest.mark.parametrize("case,name,kwargs", ALL_CONFIGS, ids=[c[0] for c in ALL_CONFIGS])
def test_class_without_images_gives_finite_loss_and_gradient(case, name, kwargs):
    counts = [500, 0, 30, 10, 2]
    logits, targets = batch(3)
    loss_fn = build_head_loss(name, counts, **kwargs)
    for t in [targets, torch.ones(N, dtype=torch.long)]:  # also a batch of the empty class only
        z = logits.clone().requires_grad_()
        loss = loss_fn(z, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), case
    for buffer in loss_fn.buffers():
        assert torch.isfinite(buffer.double()).all()


def test_zero_count_conventions():
    counts = [500, 0, 30, 10, 2]
    log_prior = LogitAdjustedLoss(counts).log_prior
    assert log_prior[1].item() == pytest.approx(math.log(1 / 542), rel=1e-6)  # counted as 1 image
    assert BalancedSoftmaxLoss(counts).log_counts[1].item() == 0.0
    ldam = LDAMLoss(counts)
    assert ldam.margins[1].item() == pytest.approx(0.5)  # margin of a 1-image class = max
    assert ldam.drw_weights[1].item() == 0.0
    # label-aware smoothing: the tail anchor is the smallest non-empty class, the empty class is tail
    factors = label_aware_smoothing_factors(counts, 0.3, 0.1, "linear")
    assert factors[1].item() == pytest.approx(0.1) and factors[4].item() == pytest.approx(0.1)
    assert factors[0].item() == pytest.approx(0.3)


@pytest.mark.parametrize("case,name,kwargs", ALL_CONFIGS, ids=[c[0] for c in ALL_CONFIGS])
def test_bf16_logits_give_a_float32_loss_close_to_fp32(case, name, kwargs):
    logits, targets = batch(4, scale=1.0)
    loss_fn = build_head_loss(name, COUNTS, **kwargs)
    full = loss_fn(logits, targets)
    half_logits = logits.bfloat16().requires_grad_()
    half = loss_fn(half_logits, targets)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.03, abs=1e-3)
    half.backward()
    assert (
        half_logits.grad.dtype == torch.bfloat16 and torch.isfinite(half_logits.grad.float()).all()
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_fn(logits, targets).dtype == torch.float32


def test_empty_batch_gives_a_graph_connected_zero():
    z = torch.zeros(0, C, requires_grad=True)
    for name in HEAD_LOSSES:
        loss = build_head_loss(name, COUNTS)(z, torch.zeros(0, dtype=torch.long))
        assert loss.item() == 0.0
        loss.backward()


def test_counts_are_non_persistent_buffers():
    loss_fn = LDAMLoss(COUNTS, drw_epoch=1)
    assert loss_fn.class_counts.dtype == torch.int64 and loss_fn.class_counts.tolist() == COUNTS
    assert loss_fn.state_dict() == {}
    assert loss_fn.num_classes == C


# --- registry and errors -----------------------------------------------------------------------
def test_registry_builds_every_loss():
    assert sorted(HEAD_LOSSES) == ["balanced_softmax", "ce", "focal", "label_aware_smoothing", "ldam", "logit_adjusted"]
    assert build_head_loss("ldam", COUNTS).__class__ is LDAMLoss
    for name, cls in HEAD_LOSSES.items():
        loss_fn = build_head_loss(name, COUNTS)
        assert type(loss_fn) is cls and isinstance(loss_fn, HeadLoss)


def test_unknown_name_lists_valid_names_and_the_config_key():
    with pytest.raises(ValueError, match=r"model\.head_loss\b.*valid") as info:
        build_head_loss("cb_focal", COUNTS)
    for name in HEAD_LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("ce", {"temperature": 2.0}),  # unknown keyword
        ("balanced_softmax", {"tau": 1.0}),
        ("ce", {"weighting": "sqrt"}),
        ("ce", {"beta": 1.0}),
        ("focal", {"gamma": -1.0}),
        ("focal", {"weighting": "balanced"}),
        ("logit_adjusted", {"tau": "big"}),
        ("ldam", {"scale": 0.0}),
        ("ldam", {"drw_epoch": 1.5}),
        ("ldam", {"beta": -0.1}),
        ("label_aware_smoothing", {"shape": "sigmoid"}),
        ("label_aware_smoothing", {"shape": "exp"}),  # needs power
        ("label_aware_smoothing", {"smooth_head": 1.5}),
    ],
)
def test_bad_kwargs_name_the_config_key(name, kwargs):
    with pytest.raises(ValueError, match=r"model\.head_loss_kwargs"):
        build_head_loss(name, COUNTS, **kwargs)


@pytest.mark.parametrize("counts", [[], [5, -1], [0, 0], [2.5, 3], [[1, 2]]])
def test_bad_class_counts_are_rejected(counts):
    with pytest.raises(ValueError, match="class_counts"):
        build_head_loss("ce", counts)


def test_shape_mismatch_is_reported():
    loss_fn = CrossEntropyLoss(COUNTS)
    with pytest.raises(ValueError, match="class_counts"):
        loss_fn(torch.zeros(4, C + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        loss_fn(torch.zeros(4, C), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("case,name,kwargs", ALL_CONFIGS, ids=[c[0] for c in ALL_CONFIGS])
def test_saturated_logits_give_finite_gradients(case, name, kwargs):
    """p_t rounding to 1 (and to 0) in float32, e.g. focal with gamma < 1."""
    logits = torch.full((2 * C, C), -60.0)
    targets = torch.arange(C).repeat(2)
    logits[torch.arange(C), targets[:C]] = 60.0  # confidently right
    logits[torch.arange(C, 2 * C), (targets[C:] + 1) % C] = 60.0  # confidently wrong
    z = logits.requires_grad_()
    loss = build_head_loss(name, COUNTS, **kwargs)(z, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), case
