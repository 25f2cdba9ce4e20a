"""RMSpropTF, the learning-rate schedules and the weight EMA against their definitions (timm as oracle)."""

import math

import pytest
import torch
from torch import nn

from mixnet.training.optimizers import (LRSchedule, ModelEma, RMSpropTF, create_optimizer, muon_groups, orthogonalize,
                                       parameter_groups)


def _rmsprop_tf_reference(param, grads, lr, alpha, eps, momentum, weight_decay):
    """TensorFlow's RMSProp written out: ms starts at 1, eps inside the sqrt, lr inside the momentum."""
    p = param.clone()
    ms = torch.ones_like(p)
    mom = torch.zeros_like(p)
    for g in grads:
        g = g + weight_decay * p
        ms = alpha * ms + (1 - alpha) * g * g
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)
        p = p - mom
    return p


def _run(optimizer_factory, param0, grads):
    p = nn.Parameter(param0.clone())
    opt = optimizer_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.fixture
def grads():
    torch.manual_seed(0)
    return torch.randn(6), [torch.randn(6) * s for s in (1.0, 0.01, 3.0, 0.5, 0.0, 2.0)]


def test_rmsprop_tf_matches_the_tensorflow_definition(grads):
    p0, gs = grads
    ours = _run(lambda ps: RMSpropTF(ps, lr=0.016, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5), p0, gs)
    ref = _rmsprop_tf_reference(p0, gs, lr=0.016, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    # and it is not torch's RMSprop (eps outside the sqrt, ms from 0): the semantics matter
    torch_rms = _run(lambda ps: torch.optim.RMSprop(ps, lr=0.016, alpha=0.9, eps=1e-3, momentum=0.9), p0, gs)
    assert not torch.allclose(ours, torch_rms, atol=1e-4)


def test_rmsprop_tf_matches_timm(grads):
    timm_optim = pytest.importorskip("timm.optim")
    p0, gs = grads
    for kwargs in (dict(momentum=0.9, weight_decay=1e-5), dict(momentum=0.0, weight_decay=0.0)):
        ours = _run(lambda ps: RMSpropTF(ps, lr=0.016, alpha=0.9, eps=1e-3, **kwargs), p0, gs)
        theirs = _run(lambda ps: timm_optim.RMSpropTF(ps, lr=0.016, alpha=0.9, eps=1e-3, **kwargs), p0, gs)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_rmsprop_tf_momentum_uses_the_lr_of_each_step(grads):
    p0, gs = grads
    p = nn.Parameter(p0.clone())
    opt = RMSpropTF([p], lr=0.1, momentum=0.9)
    p.grad = gs[0].clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = 0.0  # a zero lr still moves the weights by the decayed old momentum
    before = p.detach().clone()
    p.grad = gs[1].clone()
    opt.step()
    torch.testing.assert_close(before - p.detach(), 0.9 * buf)


def test_step_schedule_matches_its_definition_and_timm():
    scheduler_mod = pytest.importorskip("timm.scheduler")
    sched = LRSchedule("step", lr=0.048, epochs=450, warmup_epochs=5, warmup_lr=1e-6, decay_epochs=2.4,
                       decay_rate=0.969)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.048)
    # timm's train.py (the recipe's script) counts decay periods from epoch 0: warmup_prefix=False
    timm_sched = scheduler_mod.StepLRScheduler(opt, decay_t=2.4, decay_rate=0.969, warmup_t=5,
                                               warmup_lr_init=1e-6, warmup_prefix=False)
    for t in range(0, 40):
        if t < 5:
            expected = 1e-6 + t * (0.048 - 1e-6) / 5
        else:
            expected = 0.048 * 0.969 ** math.floor(t / 2.4)
        assert sched(t) == pytest.approx(expected, rel=1e-12)
        assert sched(t) == pytest.approx(timm_sched._get_lr(t)[0], rel=1e-12)


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    sched = LRSchedule("cosine", lr=1.0, epochs=10, warmup_epochs=2, warmup_lr=0.0, min_lr=0.1)
    assert sched(0) == 0.0
    assert sched(1) == pytest.approx(0.5)
    assert sched(2) == pytest.approx(1.0)
    assert sched(6) == pytest.approx(0.55)  # halfway down: (1 + 0.1) / 2
    assert sched(10) == pytest.approx(0.1)
    values = [sched(2 + 0.5 * i) for i in range(17)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_held_schedules_stay_at_the_peak_then_decay_to_min_lr_by_the_end():
    # 2 warm-up epochs, then half of the remaining 8 held at the peak: the decay runs from t=6 to t=10.
    cosine = LRSchedule("cosine", lr=1.0, epochs=10, warmup_epochs=2, warmup_lr=0.0, min_lr=0.1, hold=0.5)
    linear = LRSchedule("linear", lr=1.0, epochs=10, warmup_epochs=2, warmup_lr=0.0, min_lr=0.1, hold=0.5)
    for sched in (cosine, linear):
        assert sched(1) == pytest.approx(0.5)
        assert sched(2) == sched(4) == sched(6) == 1.0
        assert sched(8) == pytest.approx(0.55)  # halfway down, for both shapes
        assert sched(10) == pytest.approx(0.1)
    assert linear(7) == pytest.approx(1.0 - 0.9 / 4)
    assert cosine(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_adamw_takes_the_second_moment_decay_it_is_given():
    assert create_optimizer("adamw", nn.Linear(2, 2), lr=0.1, weight_decay=0.0).param_groups[0]["betas"] == \
        (0.9, 0.999)
    assert create_optimizer("adamw", nn.Linear(2, 2), lr=0.1, weight_decay=0.0, beta2=0.99
                            ).param_groups[0]["betas"] == (0.9, 0.99)


def test_unknown_schedule_and_optimizer_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("exponential", lr=1.0, epochs=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer("lion", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)


def test_weight_decay_spares_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight and bias, linear bias


@pytest.mark.parametrize("shape", [(48, 12), (12, 48)])
def test_orthogonalize_keeps_the_singular_vectors_and_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    spread = torch.logspace(-1, 1, min(shape))  # singular values from 0.1 to 10
    result = orthogonalize((u * spread) @ v.T)
    values = torch.linalg.svdvals(result)
    assert values.min() > 0.6 and values.max() < 1.25
    # u^T result v is diagonal: the update keeps the gradient's directions and equalises their sizes
    inner = u.T @ result @ v
    assert (inner - torch.diag(torch.diagonal(inner))).abs().max() < 1e-4


def test_muon_moves_dense_convs_by_orthogonalised_nesterov_momentum_and_the_rest_as_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=16),
                          nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16, 2))
    muon, other, vectors = muon_groups(model, 0.05)
    assert [p.shape for p in muon["params"]] == [(16, 8, 1, 1)]  # not the stem, depthwise or classifier
    assert muon["muon"] and vectors["weight_decay"] == 0.0 and len(vectors["params"]) == 6
    reference = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer("muon", model, lr=0.01, weight_decay=0.05, beta2=0.99)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    k = [id(p) for p in model.parameters()].index(id(model[1].weight))
    w = model[1].weight.detach().clone()
    buf = torch.zeros_like(w)
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g.clone()
        opt.step()
        g = step[k]
        buf = 0.95 * buf + 0.05 * g
        nesterov = 0.05 * g + 0.95 * buf
        w = w * (1 - 0.01 * 0.05) - 0.01 * 0.2 * math.sqrt(16) * orthogonalize(nesterov.flatten(1)).view_as(w)
    assert torch.allclose(model[1].weight, w, atol=1e-6)
    for i, p in enumerate(model.parameters()):
        if i == k:
            continue
        q = nn.Parameter(reference[i].clone())
        ref = torch.optim.AdamW([q], lr=0.01, betas=(0.9, 0.99), weight_decay=0.05 if p.ndim > 1 else 0.0)
        for step in grads:
            q.grad = step[i].clone()
            ref.step()
        assert torch.allclose(p, q, atol=1e-6), i


def test_ema_is_an_exponential_average_of_weights_and_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9, warmup=False)
    start = [t.clone() for t in ema.module.state_dict().values()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    ema.update(model, updates=0)
    for s, (name, e), m in zip(start, ema.module.state_dict().items(), model.state_dict().values()):
        if e.is_floating_point():
            torch.testing.assert_close(e, 0.9 * s + 0.1 * m, msg=name)
        else:
            assert torch.equal(e, m), name
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_starts_fast_and_caps_at_decay():
    ema = ModelEma(nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10 ** 6) == 0.999
