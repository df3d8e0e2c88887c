"""PCCT (class-centre triplet) and center loss checked against naive float64 loops of their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmetric.lightning_modules.losses.center import CenterLoss
from medmetric.lightning_modules.losses.class_center_triplet import ClassCenterTripletLoss

C, D, MARGIN = 4, 8, 0.2


# ----------------------------------------------------------------------------- data


def make_batch(seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings (N, 8) and labels over 4 classes, shuffled."""
    g = torch.Generator().manual_seed(seed)
    counts = {
        "m_per_class": [5, 5, 5, 5],  # what an m-per-class sampler gives
        "unbalanced": [10, 6, 3, 1],  # one class without a positive pair
        "missing_class": [11, 0, 6, 1],  # class 1 absent from the batch
    }[kind]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.randn(len(labels), D, generator=g), labels


def weighted_mean(per_class: dict[int, list[torch.Tensor]], weights) -> torch.Tensor:
    """Mean of each class's terms, then the (class-weighted) mean over classes with terms."""
    means = {c: torch.stack(terms).mean() for c, terms in per_class.items() if terms}
    if not means:
        return torch.zeros((), dtype=torch.float64)
    w = {c: 1.0 if weights is None else float(weights[c]) for c in means}
    return sum(w[c] * means[c] for c in means) / sum(w.values())


# ----------------------------------------------------------------------------- naive references


def ref_balanced_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float, weights=None) -> torch.Tensor:
    """Stage 1: all (a, p, n), y_a = y_p, p != a, y_n != y_a; hinge on Euclidean distances of
    normalised embeddings; mean per anchor class, then (weighted) mean over classes."""
    x = [e / e.norm() for e in emb]
    y = [int(v) for v in labels]
    n = len(x)
    dist = [[(x[i] - x[j]).norm() if i != j else None for j in range(n)] for i in range(n)]
    per_class: dict[int, list[torch.Tensor]] = {}
    for a in range(n):
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            for q in range(n):
                if y[q] == y[a]:
                    continue
                term = torch.clamp(dist[a][p] - dist[a][q] + margin, min=0.0)
                per_class.setdefault(y[a], []).append(term)
    return weighted_mean(per_class, weights)


def ref_center_triplet(emb, labels, centers, available, margin: float, weights=None) -> torch.Tensor:
    """Stage 2: every anchor a and every available class k != y_a:
    max(0, ||x_a - c^_{y_a}|| - ||x_a - c^_k|| + margin), c^ = normalised centres."""
    x = [e / e.norm() for e in emb]
    cen = [c / c.norm() for c in centers]
    per_class: dict[int, list[torch.Tensor]] = {}
    for a, ya in enumerate(int(v) for v in labels):
        for k in range(len(cen)):
            if k == ya or not available[k]:
                continue
            term = torch.clamp((x[a] - cen[ya]).norm() - (x[a] - cen[k]).norm() + margin, min=0.0)
            per_class.setdefault(ya, []).append(term)
    return weighted_mean(per_class, weights)


def ref_batch_means(emb: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Mean of the normalised (detached, float64) embeddings of each class in the batch."""
    out = {}
    for c in sorted({int(v) for v in labels}):
        rows = [emb[i].double() / emb[i].double().norm() for i in range(len(labels)) if int(labels[i]) == c]
        out[c] = sum(rows) / len(rows)
    return out


def ref_centers_in_use(emb, labels, centers, seen):
    """Running-mean mode: stored centre if seen, else the batch mean; available = seen or present."""
    means = ref_batch_means(emb.detach(), labels)
    used = [centers[k].double() if seen[k] else means.get(k, torch.zeros(D, dtype=torch.float64)) for k in range(C)]
    available = [bool(seen[k]) or k in means for k in range(C)]
    return torch.stack(used), available


def ref_center_loss(emb, labels, centers, weights=None) -> torch.Tensor:
    """Wen et al. 2016 eq. 2 divided by the batch size (weighted mean of 1/2 ||x_i - c_{y_i}||^2)."""
    terms, ws = [], []
    for i in range(len(labels)):
        terms.append(0.5 * ((emb[i] - centers[int(labels[i])]) ** 2).sum())
        ws.append(1.0 if weights is None else float(weights[int(labels[i])]))
    return sum(w * t for w, t in zip(ws, terms, strict=True)) / sum(ws)


def grad_of(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    return out.detach(), grads


def assert_close(got, want, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=atol)


WEIGHTS = torch.tensor([0.4, 1.0, 2.2, 0.4])
KINDS = ["m_per_class", "unbalanced", "missing_class"]


# ----------------------------------------------------------------------------- PCCT stage 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["running_mean", "learnable"])
def test_stage1_is_class_balanced_triplet_reference(seed, kind, mode):
    emb, labels = make_batch(seed, kind)
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=3, center_mode=mode)
    loss_fn.set_epoch(2)
    got, (g_got,) = grad_of(lambda e: loss_fn(e, labels), emb)
    want, (g_want,) = grad_of(lambda e: ref_balanced_triplet(e, labels, MARGIN), emb.double())
    assert got.dtype == torch.float32 and got.item() > 0
    assert_close(got, want)
    assert_close(g_got, g_want)


def test_stage1_class_weights_weight_the_per_class_means():
    emb, labels = make_batch(5, "unbalanced")
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN)
    loss_fn.set_class_weights(WEIGHTS)
    got, (g_got,) = grad_of(lambda e: loss_fn(e, labels), emb)
    want, (g_want,) = grad_of(lambda e: ref_balanced_triplet(e, labels, MARGIN, WEIGHTS), emb.double())
    assert_close(got, want)
    assert_close(g_got, g_want)


def test_stage1_counts_each_class_equally_not_each_triplet():
    """A class with 10 images must not outweigh a class with 3 (class-balanced sampling)."""
    emb, labels = make_batch(3, "unbalanced")
    x = F.normalize(emb.double(), dim=1)
    per_triplet = []  # plain mean over all triplets: differs from the class-balanced value
    for a in range(len(x)):
        for p in range(len(x)):
            for q in range(len(x)):
                if p != a and labels[p] == labels[a] and labels[q] != labels[a]:
                    per_triplet.append(max(0.0, float((x[a] - x[p]).norm() - (x[a] - x[q]).norm()) + MARGIN))
    got = ClassCenterTripletLoss(C, D, margin=MARGIN)(emb, labels).item()
    assert got == pytest.approx(ref_balanced_triplet(emb.double(), labels, MARGIN).item(), rel=1e-5)
    assert got != pytest.approx(sum(per_triplet) / len(per_triplet), rel=1e-3)


# ----------------------------------------------------------------------------- PCCT stage 2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_stage2_running_mean_fresh_uses_batch_means(seed, kind):
    """No centre yet: each class present uses its (detached) batch mean; absent classes are no negatives."""
    emb, labels = make_batch(seed, kind)
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=1).eval()
    loss_fn.set_epoch(1)
    got, (g_got,) = grad_of(lambda e: loss_fn(e, labels), emb)

    def ref(e):
        centers, available = ref_centers_in_use(e, labels, torch.zeros(C, D), [False] * C)
        return ref_center_triplet(e, labels, centers, available, MARGIN)

    want, (g_want,) = grad_of(ref, emb.double())
    assert_close(got, want)
    assert_close(g_got, g_want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_stage2_running_mean_with_stored_centres(seed, kind):
    """Stored centres for classes 0 and 1 only: class 2/3 fall back to batch means when present."""
    emb, labels = make_batch(seed, kind)
    g = torch.Generator().manual_seed(100 + seed)
    stored = torch.randn(C, D, generator=g)
    seen = torch.tensor([True, True, False, False])
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=0).eval()
    loss_fn.centers.copy_(stored)
    loss_fn.center_seen.copy_(seen)
    loss_fn.set_class_weights(WEIGHTS if seed == 2 else None)
    got, (g_got,) = grad_of(lambda e: loss_fn(e, labels), emb)

    def ref(e):
        centers, available = ref_centers_in_use(e, labels, stored, seen.tolist())
        return ref_center_triplet(e, labels, centers, available, MARGIN, WEIGHTS if seed == 2 else None)

    want, (g_want,) = grad_of(ref, emb.double())
    assert_close(got, want)
    assert_close(g_got, g_want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_stage2_learnable_values_and_gradients(seed, kind):
    emb, labels = make_batch(seed, kind)
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=0, center_mode="learnable")
    torch.manual_seed(seed)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.randn(C, D))
    proxies = loss_fn.centers.detach().clone()

    emb_leaf = emb.clone().requires_grad_(True)
    got = loss_fn(emb_leaf, labels)
    got.backward()
    want, (g_emb, g_cen) = grad_of(
        lambda e, c: ref_center_triplet(e, labels, c, [True] * C, MARGIN), emb.double(), proxies.double()
    )
    assert_close(got.detach(), want)
    assert_close(emb_leaf.grad, g_emb)
    assert_close(loss_fn.centers.grad, g_cen)


def test_learnable_centres_are_parameters_and_receive_gradients():
    emb, labels = make_batch(0, "m_per_class")
    loss_fn = ClassCenterTripletLoss(C, D, start_epoch=1, center_mode="learnable")
    assert any(p is loss_fn.centers for p in loss_fn.parameters())  # the optimiser will see it
    loss_fn.set_epoch(0)  # stage 1: proxies unused but still in the graph (DDP)
    loss_fn(emb, labels).backward()
    assert loss_fn.centers.grad is not None and torch.count_nonzero(loss_fn.centers.grad) == 0
    loss_fn.centers.grad = None
    loss_fn.set_epoch(1)
    loss_fn(emb, labels).backward()
    assert loss_fn.centers.grad is not None and loss_fn.centers.grad.abs().sum() > 0
    assert list(ClassCenterTripletLoss(C, D).parameters()) == []  # running means are buffers


# ----------------------------------------------------------------------------- running means


def test_running_mean_update_two_batches_by_hand():
    momentum = 0.7
    loss_fn = ClassCenterTripletLoss(C, D, start_epoch=5, center_mode="running_mean", momentum=momentum).train()
    emb1, labels1 = make_batch(0, "missing_class")  # classes 0, 2, 3
    emb2, labels2 = make_batch(1, "unbalanced")  # classes 0, 1, 2, 3
    labels2 = torch.where(labels2 == 3, torch.tensor(2), labels2)  # classes 0, 1, 2 only

    loss_fn(emb1, labels1)
    m1 = ref_batch_means(emb1, labels1)
    want1 = torch.zeros(C, D, dtype=torch.float64)
    for k, mean in m1.items():
        want1[k] = mean  # first sighting: the batch mean
    assert loss_fn.center_seen.tolist() == [True, False, True, True]
    assert_close(loss_fn.centers, want1, atol=1e-6)

    loss_fn.set_epoch(5)  # also updates in stage 2
    loss_fn(emb2, labels2)
    m2 = ref_batch_means(emb2, labels2)
    want2 = want1.clone()
    want2[0] = momentum * want1[0] + (1 - momentum) * m2[0]
    want2[1] = m2[1]  # first sighting
    want2[2] = momentum * want1[2] + (1 - momentum) * m2[2]
    # class 3 absent from batch 2: unchanged
    assert loss_fn.center_seen.tolist() == [True, True, True, True]
    assert_close(loss_fn.centers, want2, atol=1e-6)


def test_loss_uses_centres_from_before_the_batch():
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=0).train()
    emb1, labels1 = make_batch(0, "m_per_class")
    emb2, labels2 = make_batch(1, "unbalanced")
    loss_fn(emb1, labels1)
    before = loss_fn.centers.clone().double()
    got = loss_fn(emb2, labels2)
    want = ref_center_triplet(emb2.double(), labels2, before, [True] * C, MARGIN)
    assert_close(got, want)


def test_centres_not_updated_in_eval_mode():
    emb, labels = make_batch(0, "m_per_class")
    loss_fn = ClassCenterTripletLoss(C, D, start_epoch=0)
    loss_fn(emb, labels)  # train mode: sets the centres
    centers, seen = loss_fn.centers.clone(), loss_fn.center_seen.clone()
    loss_fn.eval()
    for epoch in (0, 1):
        loss_fn.set_epoch(epoch)
        loss_fn(*make_batch(epoch + 1, "unbalanced"))
    assert torch.equal(loss_fn.centers, centers) and torch.equal(loss_fn.center_seen, seen)
    fresh = ClassCenterTripletLoss(C, D).eval()
    fresh(emb, labels)
    assert not fresh.center_seen.any() and torch.count_nonzero(fresh.centers) == 0


# ----------------------------------------------------------------------------- schedule


def test_progressive_schedule_switches_at_start_epoch():
    start = 3
    loss_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=start).train()
    loss_fn(*make_batch(10, "m_per_class"))  # warm the centres
    emb, labels = make_batch(4, "unbalanced")
    for epoch in (0, start - 1, start, start + 4):
        loss_fn.set_epoch(epoch)
        centers, seen = loss_fn.centers.clone(), loss_fn.center_seen.clone()
        got, (g_got,) = grad_of(lambda e: loss_fn(e, labels), emb)
        if epoch < start:
            ref = lambda e: ref_balanced_triplet(e, labels, MARGIN)  # noqa: E731
        else:

            def ref(e, centers=centers, seen=seen):
                used, available = ref_centers_in_use(e, labels, centers, seen.tolist())
                return ref_center_triplet(e, labels, used, available, MARGIN)

        want, (g_want,) = grad_of(ref, emb.double())
        assert_close(got, want)
        assert_close(g_got, g_want)
    assert loss_fn.uses_centers


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(
    "mode,epoch", [("running_mean", 0), ("running_mean", 1), ("learnable", 0)], ids=["rm-stage1", "rm-stage2", "learn-stage1"]
)
def test_single_class_batch_is_zero_with_gradient(mode, epoch):
    loss_fn = ClassCenterTripletLoss(C, D, start_epoch=1, center_mode=mode)
    loss_fn.set_epoch(epoch)
    emb = torch.randn(6, D, requires_grad=True)
    loss = loss_fn(emb, torch.full((6,), 2))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_no_nan_when_an_anchor_sits_on_its_centre_or_duplicates():
    """A singleton class's batch-mean centre is the anchor itself (distance 0); duplicated
    embeddings give zero positive distances: gradients stay finite."""
    emb = torch.randn(6, D)
    emb[1] = emb[0]  # duplicate positive pair
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    for epoch in (0, 1):
        loss_fn = ClassCenterTripletLoss(C, D, start_epoch=1)
        loss_fn.set_epoch(epoch)
        leaf = emb.clone().requires_grad_(True)
        loss = loss_fn(leaf, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("epoch", [0, 1])
def test_bf16_input_gives_float32_close_to_fp32(epoch):
    emb, labels = make_batch(0, "unbalanced")
    ref_fn = ClassCenterTripletLoss(C, D, margin=MARGIN, start_epoch=1).eval()
    ref_fn.set_epoch(epoch)
    fp32 = ref_fn(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref_fn(emb.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(fp32.item(), rel=3e-2, abs=3e-3)


def test_state_dict_round_trip_keeps_centres():
    src = ClassCenterTripletLoss(C, D, start_epoch=0)
    src(*make_batch(0, "missing_class"))
    assert set(src.state_dict()) == {"centers", "center_seen"}
    dst = ClassCenterTripletLoss(C, D, start_epoch=0)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.centers, src.centers) and torch.equal(dst.center_seen, src.center_seen)

    src_l = ClassCenterTripletLoss(C, D, center_mode="learnable")
    dst_l = ClassCenterTripletLoss(C, D, center_mode="learnable")
    dst_l.load_state_dict(src_l.state_dict())
    assert torch.equal(dst_l.centers, src_l.centers)


def test_bad_center_mode_names_the_config_key():
    with pytest.raises(ValueError, match=r"model\.metric_loss_kwargs\.center_mode.*running_mean.*learnable"):
        ClassCenterTripletLoss(C, D, center_mode="ema")


@pytest.mark.parametrize(
    "kwargs", [{"momentum": 1.0}, {"momentum": -0.1}, {"margin": -1.0}, {"start_epoch": -1}]
)
def test_bad_hyperparameters_rejected(kwargs):
    with pytest.raises(ValueError, match="model.metric_loss_kwargs"):
        ClassCenterTripletLoss(C, D, **kwargs)


# ----------------------------------------------------------------------------- center loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_center_loss_values_and_gradients(seed, kind, weighted):
    emb, labels = make_batch(seed, kind)
    loss_fn = CenterLoss(C, D)
    torch.manual_seed(seed)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.randn(C, D))
    centers = loss_fn.centers.detach().clone()
    if weighted:
        loss_fn.set_class_weights(WEIGHTS)
    leaf = emb.clone().requires_grad_(True)
    got = loss_fn(leaf, labels)
    got.backward()
    want, (g_emb, g_cen) = grad_of(
        lambda e, c: ref_center_loss(e, labels, c, WEIGHTS if weighted else None), emb.double(), centers.double()
    )
    assert got.dtype == torch.float32
    assert_close(got.detach(), want)
    assert_close(leaf.grad, g_emb)
    assert_close(loss_fn.centers.grad, g_cen)


def test_center_loss_centres_learn_and_round_trip():
    emb, labels = make_batch(0, "unbalanced")
    loss_fn = CenterLoss(C, D)
    assert [p is loss_fn.centers for p in loss_fn.parameters()] == [True]
    loss_fn(emb, labels).backward()
    g = loss_fn.centers.grad
    assert g is not None and g[:3].abs().sum() > 0  # classes in the batch get pulled
    dst = CenterLoss(C, D)
    with torch.no_grad():
        loss_fn.centers.add_(1.0)
    dst.load_state_dict(loss_fn.state_dict())
    assert torch.equal(dst.centers, loss_fn.centers)


def test_center_loss_empty_batch_is_zero_with_gradient_and_bf16_is_float32():
    loss_fn = CenterLoss(C, D)
    emb = torch.randn(0, D, requires_grad=True)
    loss = loss_fn(emb, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and loss_fn.centers.grad is not None

    emb, labels = make_batch(1, "m_per_class")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(emb.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss_fn(emb, labels).item(), rel=2e-2)
