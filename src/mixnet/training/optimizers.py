"""Optimisers, learning-rate schedules and the weight EMA used by ``mixnet train``.

``RMSpropTF`` is RMSprop as TensorFlow defines it (the optimiser of the published MixNet weights);
``LRSchedule`` is a pure function of training progress, so resuming needs only the step count.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor, nn

from .config import OPTIMIZERS, SCHEDULES


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop with TensorFlow's semantics, which differ from ``torch.optim.RMSprop`` in three ways:

    - the mean square starts at 1, not 0 (no huge first steps);
    - epsilon is added inside the square root: ``g / sqrt(ms + eps)``;
    - the learning rate is applied inside the momentum buffer, so a learning-rate change affects
      only new gradients: ``mom = momentum * mom + lr * g / sqrt(ms + eps); p -= mom``.

    Per step: ``ms = alpha * ms + (1 - alpha) * g^2`` (``centered``: also ``mg = alpha * mg + (1 -
    alpha) * g`` and the denominator is ``sqrt(ms - mg^2 + eps)``). Weight decay is L2 added to the
    gradient (``g += weight_decay * p``), as in TF's regularisers.
    """

    def __init__(self, params, lr: float = 0.01, alpha: float = 0.9, eps: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, centered: bool = False):
        for name, value in (("lr", lr), ("eps", eps), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                                      weight_decay=weight_decay, centered=centered))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.ones_like(p)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p)
                state["step"] += 1
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1.0 - group["alpha"])
                if group["centered"]:
                    grad_avg = state["grad_avg"]
                    grad_avg.mul_(group["alpha"]).add_(grad, alpha=1.0 - group["alpha"])
                    denom = square_avg.addcmul(grad_avg, grad_avg, value=-1.0).add_(group["eps"]).sqrt_()
                else:
                    denom = square_avg.add(group["eps"]).sqrt_()
                if group["momentum"] > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).addcdiv_(grad, denom, value=group["lr"])
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-group["lr"])
        return loss


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """The nearest semi-orthogonal matrix to ``g``, roughly (Muon's quintic Newton-Schulz iteration, whose
    coefficients push every singular value into about [0.7, 1.2] in 5 steps rather than exactly to 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / g.norm().clamp(min=1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.AdamW):
    """Muon (Jordan et al. 2024) for the weight matrices of dense convolutions, AdamW for the rest.

    Parameter groups with ``muon=True`` take Nesterov momentum, orthogonalised by ``orthogonalize`` (a
    conv weight flattened to out x in*k*k) and scaled to AdamW's update size (0.2 sqrt(max(out, in*k*k)),
    Moonshot's rule), so both kinds of group share one learning rate and schedule; weight decay is
    decoupled as in AdamW. Their gradients are consumed (set to None), so that AdamW's own step, which
    does the other groups, skips them. ``torch.optim.Muon`` takes 2-d parameters only, hence this class.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 muon_momentum: float = 0.95):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group.setdefault("muon", False)
            group.setdefault("muon_momentum", muon_momentum)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            if not group["muon"]:
                continue
            lr, momentum = group["lr"], group["muon_momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # "step" too, which AdamW's load_state_dict expects of every state
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] += 1
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                update = orthogonalize(p.grad.lerp(buf, momentum).flatten(1))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-lr * 0.2 * math.sqrt(max(update.shape)))
                p.grad = None
        return super().step()


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on conv and linear weights only: biases and BatchNorm parameters (1-d) are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def muon_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """``parameter_groups`` with the dense convolutions after the stem (groups=1, more than 3 input
    channels) in a group of their own for Muon; the stem, depthwise convs, classifier, biases and
    BatchNorm stay with AdamW (as Muon's authors keep first and last layers and vectors on Adam)."""
    decay, no_decay = parameter_groups(model, weight_decay)
    dense = {id(m.weight) for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3}
    return [dict(decay, params=[p for p in decay["params"] if id(p) in dense], muon=True),
            dict(decay, params=[p for p in decay["params"] if id(p) not in dense]), no_decay]


def create_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                     eps: float = 1e-8, nesterov: bool = True, beta2: float = 0.999) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps, betas=(0.9, beta2))
    if name == "rmsproptf":
        return RMSpropTF(groups, lr=lr, eps=eps, momentum=momentum)
    if name == "muon":
        return MuonAdamW(muon_groups(model, weight_decay), lr=lr, eps=eps, betas=(0.9, beta2))
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of training progress ``t`` in epochs (fractional when stepped per update).

    Warmup: linear from ``warmup_lr`` at t=0 to ``lr`` at ``t = warmup_epochs``. Then:

    - ``cosine``: ``lr`` held for ``hold`` (a fraction) of the post-warmup span, then down to ``min_lr`` at
      ``t = epochs`` along half a cosine;
    - ``linear``: the same with a straight line down;
    - ``step``: ``lr * decay_rate ** floor(t / decay_epochs)`` (t counted from the start, warmup included,
      as in the reference recipe);
    - ``constant``: ``lr``.
    """

    kind: str
    lr: float
    epochs: float
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    hold: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r} (known: {', '.join(SCHEDULES)})")

    def __call__(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup_epochs
        if self.kind == "step":
            return self.lr * self.decay_rate ** math.floor(t / self.decay_epochs)
        if self.kind in ("cosine", "linear"):
            start = self.warmup_epochs + self.hold * (self.epochs - self.warmup_epochs)
            progress = min(max(t - start, 0.0) / max(self.epochs - start, 1e-12), 1.0)
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
            return self.min_lr + (self.lr - self.min_lr) * remaining
        return self.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights, evaluated alongside the raw ones.

    ``ema = d * ema + (1 - d) * weights`` after every optimiser update, for parameters and float
    buffers (BatchNorm statistics); integer buffers are copied. With ``warmup``, the decay is
    ``min(decay, (1 + n) / (10 + n))`` after n updates, so that short runs are not dominated by the
    random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        d = self.decay_at(updates)
        for e, m in zip(_tensors(self.module), _tensors(model)):
            if e.is_floating_point():
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)


def _tensors(model: nn.Module) -> List[Tensor]:
    return [*model.parameters(), *model.buffers()]
