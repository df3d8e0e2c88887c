"""Classifier (logit) losses that correct class imbalance: ``loss(logits (N, C), targets (N,))``.

Stage 2 re-trains a classifier head on a frozen backbone with one of these losses, built by name
from the training class counts (``build_head_loss(model.head_loss, class_counts,
**model.head_loss_kwargs)``):

=======================  ==========================================================================
``ce``                   cross-entropy, optionally class-balanced (Cui et al., CVPR 2019)
``logit_adjusted``       logit-adjusted loss (Menon et al., ICLR 2021, eq. 10)
``balanced_softmax``     Balanced Softmax (Ren et al., NeurIPS 2020)
``ldam``                 LDAM, optionally with deferred re-weighting (Cao et al., NeurIPS 2019)
``label_aware_smoothing`` label-aware smoothing of MiSLAS (Zhong et al., CVPR 2021)
``focal``                focal loss, optionally class-weighted (Lin et al., ICCV 2017)
=======================  ==========================================================================

plus :func:`adjust_logits_post_hoc` (Menon et al., eq. 9) for evaluation.

Conventions shared by every loss:

* ``class_counts`` is the number of training images per class (non-negative integers, at least
  one positive). It is kept as an ``int64`` buffer; the per-class constants derived from it
  (log-priors, margins, weights, smoothing factors) are computed once in float64 and kept as
  float32 buffers. All buffers are non-persistent: they are rebuilt from the counts, never read
  from a checkpoint.
* Classes with **zero** images never produce NaN/inf: wherever a logarithm or a negative power of
  a count appears (log-priors, LDAM margins) the count is clamped to 1, i.e. an empty class is
  treated like a class with a single image; class weights of an empty class are 0 (it has no
  training samples to weight); label-aware smoothing gives it the tail factor. Each class
  documents its own rule.
* The loss is computed in (at least) float32 with autocast disabled, so bf16/fp16 logits give a
  float32 loss; float64 logits are computed in float64. An empty batch gives a graph-connected
  zero.
* Unless stated otherwise the batch reduction is the plain mean over the N samples; with class
  weights ``w`` it is ``(1/N) sum_i w_{y_i} l_i`` as in Cui et al.'s official class-balanced code
  (so the normalisation of ``w`` sets the loss scale). LDAM-DRW follows the official LDAM-DRW
  code instead (``F.cross_entropy(weight=w)``, i.e. ``sum_i w_{y_i} l_i / sum_i w_{y_i}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmetric.lightning_modules.losses.base import class_weights_from_counts
from medmetric.lightning_modules.registry import Registry

KWARGS_KEY = "model.head_loss_kwargs"
WEIGHTINGS = ("none", "inverse", "effective_number")
SMOOTHING_SHAPES = ("concave", "linear", "convex", "exp")


# --- argument checking -------------------------------------------------------------------------
def _counts_tensor(class_counts) -> Tensor:
    """``class_counts`` as a 1-D int64 tensor, validated (non-negative integers, one positive)."""
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"class_counts must be a sequence of integers, got {class_counts!r}"
        ) from err
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}"
        )
    if not torch.isfinite(counts).all() or (counts != counts.round()).any() or (counts < 0).any():
        raise ValueError(f"class_counts must be non-negative integers, got {counts.tolist()}")
    if not (counts > 0).any():
        raise ValueError("class_counts has no class with training images (all counts are 0)")
    return counts.long()


def _number(
    name: str, value, low: float | None = None, high: float | None = None, *, high_open=False
) -> float:
    """A finite real hyper-parameter in [low, high] (or [low, high)); errors name the config key."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({KWARGS_KEY})")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r} ({KWARGS_KEY})") from err
    too_low = low is not None and number < low
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r} ({KWARGS_KEY})")
    return number


def _choice(name: str, value, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r} ({KWARGS_KEY}); valid: {list(valid)}")
    return value


def _log_prior(counts: Tensor) -> Tensor:
    """log pi_j with pi_j = max(n_j, 1) / sum_k n_k (float64; empty classes count as 1 image).

    The clamp keeps empty classes finite; it also means pi sums to slightly more than 1 when a
    class is empty, which only shifts every log pi_j by the same constant (no effect on softmax
    losses or on argmax). Same convention as ``RebalancedHeadModule.log_prior``.
    """
    counts = counts.double()
    return torch.log(counts.clamp(min=1) / counts.sum())


def _class_weights(counts: Tensor, weighting: str, beta: float) -> Tensor | None:
    """Per-class weights of ``weighting`` (None for ``none``), via the shared helper of base.py.

    ``class_weights_from_counts`` normalises to mean 1 over the classes that have images, i.e.
    ``sum_j w_j = C`` (Cui et al.'s normalisation) when every class has images, and ``sum_j w_j``
    = number of non-empty classes otherwise; empty classes get ``w_j = 0``.
    """
    if weighting == "none":
        return None
    return class_weights_from_counts(counts, weighting, beta)


#: head losses by short name; each class registers itself (``short_name``)
HEAD_LOSSES = Registry("head loss", "model.head_loss", scan=(("medmetric.lightning_modules.losses", ""),))


# --- base ----------------------------------------------------------------------------------------
class HeadLoss(nn.Module):
    """Base class: ``forward(logits (N, C), targets (N,)) -> scalar``.

    Holds the training ``class_counts`` as a (non-persistent, int64) buffer, offers a
    :meth:`set_epoch` hook (called by the LightningModule at every training epoch start; only
    LDAM-DRW uses it), and computes subclasses' :meth:`compute` in at least float32 with
    autocast disabled.

    Modules type ``head_loss`` as ``Callable[[Sequence[int]], HeadLoss]``: jsonargparse builds a
    loss's own arguments from the config (``--model.head_loss.tau=0.5``), the module supplies the
    training class counts once it knows them. A subclass with ``short_name`` registers itself in
    :data:`HEAD_LOSSES` when defined (every module of the losses package is imported before a
    short-name lookup).
    """

    short_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("short_name"):
            HEAD_LOSSES.add(cls.short_name, cls)

    def __init__(self, class_counts):
        super().__init__()
        self.register_buffer("class_counts", _counts_tensor(class_counts), persistent=False)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def set_epoch(self, epoch: int) -> None:
        """Record the current training epoch (a no-op for every loss but LDAM with DRW)."""
        self.epoch = int(epoch)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__} expects logits of shape (N, {self.num_classes}) "
                f"(one column per class of class_counts), got {tuple(logits.shape)}"
            )
        if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}"
            )
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.to(dtype)
            if logits.shape[0] == 0:
                return logits.sum() * 0.0
            return self.compute(logits, targets.long())

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of float32/float64 ``logits`` and int64 ``targets`` (N >= 1)."""
        raise NotImplementedError

    def _constant(self, buffer: Tensor, like: Tensor) -> Tensor:
        return buffer.to(device=like.device, dtype=like.dtype)


#: ``model.head_loss``: a head-loss class whose remaining argument is the training class counts
HeadLossFactory = Callable[[Sequence[int]], HeadLoss]


def _target_log_probs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log_softmax(logits) (N, C), log p_{y_i} (N,))."""
    log_probs = F.log_softmax(logits, dim=1)
    return log_probs, log_probs.gather(1, targets[:, None]).squeeze(1)


def _weighted_mean_over_batch(losses: Tensor, weights: Tensor | None, targets: Tensor) -> Tensor:
    """``(1/N) sum_i w_{y_i} l_i`` (Cui et al.'s reduction); plain mean without weights."""
    if weights is None:
        return losses.mean()
    return (weights[targets] * losses).mean()


# --- losses --------------------------------------------------------------------------------------
class CrossEntropyLoss(HeadLoss):
    r"""Softmax cross-entropy, optionally class-balanced.

    ``l_i = -w_{y_i} log p_{y_i}(x_i)``, ``p = softmax(f(x))``, loss ``= (1/N) sum_i l_i``.

    ``weighting``:

    * ``none``: ``w_j = 1`` (plain CE).
    * ``inverse``: ``w_j ∝ 1 / n_j`` (inverse class frequency).
    * ``effective_number``: the class-balanced loss of Cui et al., "Class-Balanced Loss Based on
      Effective Number of Samples", CVPR 2019 (the class-balanced softmax cross-entropy):
      ``w_j ∝ 1 / E_{n_j} = (1 - beta) / (1 - beta^{n_j})`` with the effective number
      ``E_n = (1 - beta^n) / (1 - beta)``, ``beta`` in [0, 1).

    Normalisation: ``sum_j w_j = C`` as in the paper (weights of mean 1), computed by
    ``losses.base.class_weights_from_counts``. Classes with 0 images get ``w_j = 0`` and the others
    are normalised to mean 1 among themselves (``sum_j w_j`` = number of non-empty classes). The
    batch reduction ``(1/N) sum_i w_{y_i} l_i`` follows the official class-balanced code (TF
    ``softmax_cross_entropy(weights=...)``), so the weights' scale is the loss scale.
    """

    short_name = "ce"

    def __init__(self, class_counts, weighting: str = "none", beta: float = 0.999):
        super().__init__(class_counts)
        self.weighting = _choice("weighting", weighting, WEIGHTINGS)
        self.beta = _number("beta", beta, 0.0, 1.0, high_open=True)
        self.register_buffer(
            "class_weights",
            _class_weights(self.class_counts, weighting, self.beta),
            persistent=False,
        )

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        _, target_log_probs = _target_log_probs(logits, targets)
        weights = None if self.class_weights is None else self._constant(self.class_weights, logits)
        return _weighted_mean_over_batch(self.per_sample(target_log_probs), weights, targets)

    def per_sample(self, target_log_probs: Tensor) -> Tensor:
        """Unweighted per-sample loss from log p_y (focal loss modulates it)."""
        return -target_log_probs

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, beta={self.beta}"


class LogitAdjustedLoss(HeadLoss):
    r"""Logit-adjusted softmax cross-entropy of Menon et al., "Long-Tail Learning via Logit
    Adjustment", ICLR 2021, eq. 10:

    ``l(y, f(x)) = -log [ exp(f_y(x) + tau log pi_y) / sum_j exp(f_j(x) + tau log pi_j) ]``

    with ``pi`` the training class prior ``pi_j = n_j / sum_k n_k``; mean over the batch.
    ``tau = 0`` is plain cross-entropy, ``tau = 1`` is Balanced Softmax.

    Zero counts: ``pi_j = max(n_j, 1) / sum_k n_k`` (an empty class counts as one image), so
    ``log pi_j`` stays finite; this only changes that class's offset.
    """

    short_name = "logit_adjusted"

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__(class_counts)
        self.tau = _number("tau", tau)
        self.register_buffer("log_prior", _log_prior(self.class_counts).float(), persistent=False)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        adjusted = logits + self.tau * self._constant(self.log_prior, logits)
        return F.cross_entropy(adjusted, targets)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class BalancedSoftmaxLoss(HeadLoss):
    r"""Balanced Softmax of Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020 (the Balanced Softmax
    ``phi_j = n_j exp(eta_j) / sum_k n_k exp(eta_k)``), trained with its negative log-likelihood:

    ``l(y, f(x)) = -log [ n_y exp(f_y(x)) / sum_j n_j exp(f_j(x)) ] = CE(f(x) + log n, y)``;

    mean over the batch. Since ``log n_j = log pi_j + const``, this equals
    :class:`LogitAdjustedLoss` with ``tau = 1`` exactly.

    Zero counts: ``log max(n_j, 1)`` (an empty class counts as one image).
    """

    short_name = "balanced_softmax"

    def __init__(self, class_counts):
        super().__init__(class_counts)
        self.register_buffer(
            "log_counts", self.class_counts.double().clamp(min=1).log().float(), persistent=False
        )

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits + self._constant(self.log_counts, logits), targets)


class LDAMLoss(HeadLoss):
    r"""Label-distribution-aware margin loss of Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019 (the LDAM loss), with optional deferred
    re-weighting (DRW, the paper's Algorithm 1; LDAM-DRW):

    ``l(y, f(x)) = -log [ exp(s (f_y - Delta_y)) / (exp(s (f_y - Delta_y)) + sum_{j != y} exp(s f_j)) ]``

    with per-class margins ``Delta_j = K / n_j^{1/4}``, the constant ``K`` chosen so that
    ``max_j Delta_j = max_margin`` (as in the official LDAM-DRW code), and the scale ``s``
    (``scale``). The paper uses a cosine (normalised) classifier, whose logits lie in [-1, 1],
    with ``s = 30``; with an unnormalised linear head use a smaller scale (e.g. 1).

    DRW: before epoch ``drw_epoch`` (or always when ``drw_epoch`` is None) the batch loss is the
    plain mean; from ``drw_epoch`` on (after :meth:`set_epoch`), it is the class-weighted mean
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (``F.cross_entropy(weight=w)``, as in the official code)
    with the class-balanced weights of Cui et al., ``w_j ∝ (1 - beta) / (1 - beta^{n_j})``,
    normalised to ``sum_j w_j = C`` (official code: ``beta = 0.9999``).

    Zero counts: margins use ``max(n_j, 1)`` (an empty class gets the margin of a one-image class);
    the DRW weight of an empty class is 0 and the others are normalised to mean 1 among themselves
    (see ``class_weights_from_counts``); a batch whose targets all have weight 0 gives 0.
    """

    short_name = "ldam"

    def __init__(
        self,
        class_counts,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
    ):
        super().__init__(class_counts)
        self.max_margin = _number("max_margin", max_margin, 0.0)
        self.scale = _number("scale", scale, 0.0)
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {scale!r} ({KWARGS_KEY})")
        if drw_epoch is not None and (
            isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0
        ):
            raise ValueError(
                f"drw_epoch must be a non-negative integer or null, got {drw_epoch!r} ({KWARGS_KEY})"
            )
        self.drw_epoch = drw_epoch
        self.beta = _number("beta", beta, 0.0, 1.0, high_open=True)
        margins = self.class_counts.double().clamp(min=1) ** -0.25
        margins = margins * (self.max_margin / margins.max())
        self.register_buffer("margins", margins.float(), persistent=False)
        drw_weights = _class_weights(self.class_counts, "effective_number", self.beta)
        self.register_buffer("drw_weights", drw_weights, persistent=False)

    @property
    def drw_active(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    @property
    def current_weights(self) -> Tensor | None:
        """The per-class CE weights in use at the current epoch (None = unweighted)."""
        return self.drw_weights if self.drw_active else None

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        margins = self._constant(self.margins, logits)
        one_hot = F.one_hot(targets, self.num_classes).to(logits.dtype)
        scaled = self.scale * (logits - one_hot * margins[targets][:, None])
        _, target_log_probs = _target_log_probs(scaled, targets)
        losses = -target_log_probs
        if not self.drw_active:
            return losses.mean()
        weights = self._constant(self.drw_weights, logits)[targets]
        total = weights.sum()
        # Targets that all have weight 0 (empty classes): an exact, graph-connected zero.
        return (weights * losses).sum() / torch.where(total > 0, total, torch.ones_like(total))

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, scale={self.scale}, drw_epoch={self.drw_epoch}, beta={self.beta}"


def label_aware_smoothing_factors(
    class_counts,
    smooth_head: float = 0.3,
    smooth_tail: float = 0.0,
    shape: str = "concave",
    power: float | None = None,
) -> Tensor:
    r"""Per-class smoothing factors ``eps_y = f(N_y)`` of MiSLAS (Zhong et al., CVPR 2021, Sec. 3.2).

    With ``r_y = (N_y - N_K) / (N_1 - N_K)`` in [0, 1], ``N_1`` the largest and ``N_K`` the smallest
    class count, ``eps_1 = smooth_head`` and ``eps_K = smooth_tail``:

    * concave: ``eps_K + (eps_1 - eps_K) sin(pi r_y / 2)``
    * linear:  ``eps_K + (eps_1 - eps_K) r_y``
    * convex:  ``eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi r_y / 2)``
    * exp:     ``eps_K + (eps_1 - eps_K) r_y^power`` (the official code's extra shape)

    Zero counts: ``N_K`` is the smallest count among classes that have images; an empty class has
    ``r_y`` clamped to 0, i.e. gets ``eps_K``. If every non-empty class has the same count,
    ``r_y = 1`` for them (they are all head classes: uniform smoothing ``eps_1``).
    Returns float64 factors, shape (C,).
    """
    counts = _counts_tensor(class_counts).double()
    shape = _choice("label-aware smoothing shape", shape, SMOOTHING_SHAPES)
    head = _number("smooth_head", smooth_head, 0.0, 1.0)
    tail = _number("smooth_tail", smooth_tail, 0.0, 1.0)
    n_head, n_tail = counts.max(), counts[counts > 0].min()
    if n_head > n_tail:
        ratio = ((counts - n_tail) / (n_head - n_tail)).clamp(min=0.0, max=1.0)
    else:
        ratio = (counts > 0).double()
    if shape == "concave":
        return tail + (head - tail) * torch.sin(ratio * math.pi / 2)
    if shape == "linear":
        return tail + (head - tail) * ratio
    if shape == "convex":
        return head + (head - tail) * torch.sin(1.5 * math.pi + ratio * math.pi / 2)
    if power is None:
        raise ValueError(f"label-aware smoothing shape 'exp' needs power ({KWARGS_KEY})")
    power = _number("power", power, 0.0)
    return tail + (head - tail) * ratio**power


class LabelAwareSmoothingLoss(HeadLoss):
    r"""Label-aware smoothing of MiSLAS: Zhong et al., "Improving Calibration for Long-Tailed
    Recognition", CVPR 2021, Sec. 3.2; implemented as in the official code
    (github.com/dvlab-research/MiSLAS, class ``LabelAwareSmoothing``):

    ``l(y, f(x)) = -(1 - eps_y) log p_y - (eps_y / C) sum_{j=1}^{C} log p_j``,

    i.e. cross-entropy against the smoothed target ``q_j = (1 - eps_y) [j = y] + eps_y / C``
    (the uniform part also covers the true class, as in standard label smoothing and the official
    code), mean over the batch. The per-class factor ``eps_y = f(N_y)`` grows from ``smooth_tail``
    for the smallest class to ``smooth_head`` for the largest along a concave, linear or convex
    curve (see :func:`label_aware_smoothing_factors`; ``shape="exp"`` with ``power`` is the
    official code's extra option). The official stage-2 configs use concave with
    ``smooth_tail=0.0`` and ``smooth_head`` 0.2-0.3. ``smooth_head = smooth_tail = 0`` is plain CE.
    """

    short_name = "label_aware_smoothing"

    def __init__(
        self,
        class_counts,
        smooth_head: float = 0.3,
        smooth_tail: float = 0.0,
        shape: str = "concave",
        power: float | None = None,
    ):
        super().__init__(class_counts)
        factors = label_aware_smoothing_factors(
            self.class_counts, smooth_head, smooth_tail, shape, power
        )
        self.smooth_head, self.smooth_tail, self.shape, self.power = (
            float(smooth_head),
            float(smooth_tail),
            shape,
            power,
        )
        self.register_buffer("smoothing", factors.float(), persistent=False)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_probs, target_log_probs = _target_log_probs(logits, targets)
        eps = self._constant(self.smoothing, logits)[targets]
        return ((1 - eps) * -target_log_probs + eps * -log_probs.mean(dim=1)).mean()

    def extra_repr(self) -> str:
        return f"smooth_head={self.smooth_head}, smooth_tail={self.smooth_tail}, shape={self.shape!r}, power={self.power}"


class FocalLoss(CrossEntropyLoss):
    r"""Softmax focal loss of Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017
    (eq. 4; eq. 5 with the class weight ``alpha_t``):

    ``FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t``, ``p_t = softmax(f(x))_y``,

    mean over the batch (``(1/N) sum_i``). ``alpha_t = w_{y}`` from ``weighting``: ``none``
    (``alpha = 1``), ``inverse`` (``∝ 1/n_j``) or ``effective_number`` (Cui et al., CVPR 2019: the
    class-balanced focal loss), normalised to ``sum_j w_j = C`` exactly as in
    :class:`CrossEntropyLoss` (empty classes: weight 0). ``gamma = 0`` is (weighted) CE.
    ``1 - p_t`` is computed as ``-expm1(log p_t)`` and floored at the smallest normal float so that
    ``gamma < 1`` has a finite gradient when ``p_t`` rounds to 1.
    """

    short_name = "focal"

    def __init__(
        self, class_counts, gamma: float = 2.0, weighting: str = "none", beta: float = 0.999
    ):
        super().__init__(class_counts, weighting=weighting, beta=beta)
        self.gamma = _number("gamma", gamma, 0.0)

    def per_sample(self, target_log_probs: Tensor) -> Tensor:
        losses = -target_log_probs
        if self.gamma != 0:
            one_minus_pt = (-torch.expm1(target_log_probs)).clamp(min=torch.finfo(target_log_probs.dtype).tiny)
            losses = one_minus_pt**self.gamma * losses
        return losses

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighting={self.weighting!r}, beta={self.beta}"


# --- post-hoc adjustment and registry ------------------------------------------------------------
def adjust_logits_post_hoc(logits: Tensor, class_counts, tau: float = 1.0) -> Tensor:
    r"""Post-hoc logit adjustment, Menon et al., ICLR 2021, eq. 9: ``f_j(x) - tau log pi_j``.

    ``argmax_j`` of the result is the balanced-error Bayes-optimal prediction for ``tau = 1``.
    ``pi_j = max(n_j, 1) / sum_k n_k`` (empty classes count as one image; see ``_log_prior``).
    Works on (..., C) logits; the result is at least float32 (bf16 logits give float32).
    """
    counts = _counts_tensor(class_counts)
    if logits.shape[-1] != counts.numel():
        raise ValueError(
            f"logits have {logits.shape[-1]} classes, class_counts has {counts.numel()}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_prior = _log_prior(counts).to(device=logits.device, dtype=dtype)
    return logits.to(dtype) - float(tau) * log_prior


def build_head_loss(name, class_counts, **kwargs) -> HeadLoss:
    """``HEAD_LOSSES[name](class_counts, **kwargs)``; errors name ``model.head_loss(_kwargs)``.
    ``name`` may also be a class or factory (a typed ``model.head_loss``)."""
    factory = HEAD_LOSSES.resolve(name)
    try:
        return factory(class_counts, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for head loss {name!r} ({KWARGS_KEY}): {err}") from err
