"""mixnet train: learning, exact resume after SIGKILL, DDP with torchrun, and bad input.

Everything runs on a tiny generated dataset (colour-coded classes, 32 px) with a width- and
head-reduced mixnet_s, so each run takes seconds.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ALLOW_BF16, ALONE, COMPILES_TIMEOUT, HEAVY, RunsCode, allow_bf16, randomized
from mixnet import TrainConfig, create_model, resume_training, train
from mixnet.cli import main
from mixnet.errors import MixNetError
from mixnet.factory import load_model
from mixnet.models.blocks import InvertedResidual
from mixnet.training.distributed import setup_runtime
from mixnet.training.loop import NonFiniteLoss, Trainer
from mixnet.training.run_dir import BEST, LAST, load_checkpoint, write_curves
from mixnet.training.sampling import mix_seed, progressive_size
from serve_process import free_port

TINY_MODEL = dict(width_multiplier=0.25, head_channels=64)
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def make_dataset(root: Path, train_per_class: int = 24, val_per_class: int = 6, classes=COLOURS) -> Path:
    """Noisy flat-colour images: class = dominant colour (learnable in a few updates)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, colour in enumerate(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 50, size=(36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_config(data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), output=str(output), model="mixnet_s", model_args=dict(TINY_MODEL),
                  epochs=2, batch_size=6, train_size=32, eval_size=32, workers=0, progress=False,
                  opt="adamw", lr=3e-3, warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0,
                  ema_decay=0.9, deterministic=True, checkpoint_minutes=0, seed=3, threads=1)
    values.update(overrides)
    return TrainConfig.from_recipe(None, **values)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def read_metrics(run: Path):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_few_epochs_learn_well_above_chance_and_write_the_run_directory(data, tmp_path):
    run = tmp_path / "run"
    # BatchNorm statistics need a few dozen updates to settle: 5 epochs of 6
    result = train(tiny_config(data, run, epochs=5, batch_size=12, opt="sgd", lr=0.1, scale=(0.5, 1.0)))
    assert result.completed and result.epochs_done == 5
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    best = max(max(float(r["val_top1"]), float(r["ema_val_top1"])) for r in rows)
    assert best >= 70.0, rows  # chance is 33 %
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["train_images_per_s"]) > 0 for r in rows)
    for name in ("config.json", "metrics.csv", "curves.png", LAST, BEST, "final/config.json",
                 "final/model.safetensors"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model_args"] == TINY_MODEL and config["class_names"] == ["class0", "class1", "class2"]
    # the final model loads as pretrained weights, with class names and the evaluation size
    model = load_model(run / "final")
    assert model.pretrained_cfg["class_names"] == ["class0", "class1", "class2"]
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    state = load_checkpoint(run / LAST)
    assert state.epoch == 5 and set(state.to_dict()) >= {"state_dict", "state_dict_ema", "optimizer", "rng", "config"}


def test_muon_learns_well_above_chance_as_adamw_does(data, tmp_path):
    rows = {}
    for opt in ("adamw", "muon"):
        train(tiny_config(data, tmp_path / opt, epochs=4, batch_size=12, opt=opt, lr=3e-3, ema=False))
        rows[opt] = read_metrics(tmp_path / opt)
    for opt, history in rows.items():
        assert float(history[-1]["val_top1"]) >= 70.0, (opt, history)  # chance is 33 %
    # both moved the weights and took different paths: Muon's updates are not AdamW's
    assert rows["muon"][0]["train_loss"] != rows["adamw"][0]["train_loss"]


def _run_until_killed(config_args, run: Path, kill_when, bf16: bool = False) -> None:
    """Start `mixnet train` in a subprocess and SIGKILL it once ``kill_when(checkpoint)`` holds (with
    ``bf16``, on allow_bf16's fake CPU)."""
    command = ["-c", ALLOW_BF16] if bf16 else ["-m", "mixnet"]
    proc = subprocess.Popen([sys.executable, *command, "train", *config_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / LAST).is_file() and kill_when(load_checkpoint(run / LAST)):
                break
            time.sleep(0.2)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)  # drains the pipe, so the child never blocks on it
        assert alive, f"training ended before it could be killed: {stderr.decode()[-2000:]}"
        assert proc.returncode == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def _cli_args(data: Path, run: Path, **settings):
    args = ["--data", str(data), "--output", str(run), "--model", "mixnet_s", "--no-progress", "--threads", "1"]
    for k, v in TINY_MODEL.items():
        args += ["--model-arg", f"{k}={v}"]
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, str(v)]
    return args


SETTINGS = dict(epochs=3, batch_size=6, train_size=32, eval_size=32, workers=0, opt="adamw", lr=3e-3,
                warmup_epochs=1, weight_decay=0.01, label_smoothing=0.1, ema_decay=0.9, deterministic=True,
                seed=3, drop_path_rate=0.1, randaugment_ops=2, mixup=0.4)


@HEAVY
@pytest.mark.parametrize("where,path", [pytest.param("mid-epoch", {}, id="mid-epoch"),
                                        pytest.param("end-of-epoch", {}, id="end-of-epoch"),
                                        pytest.param("mid-epoch", {"amp": "bf16"}, id="bf16"),
                                        pytest.param("mid-epoch", {"compile": True},
                                                     marks=[ALONE, COMPILES_TIMEOUT], id="compiled"),
                                        pytest.param("mid-epoch", {"opt": "muon"}, id="muon")])
def test_resume_after_sigkill_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path, monkeypatch,
                                                                             where, path):
    bf16 = path.get("amp") == "bf16"
    if bf16:
        allow_bf16(monkeypatch)
    reference = tmp_path / "reference"
    settings = dict(SETTINGS, **path)
    train(tiny_config(data, reference, **settings, checkpoint_minutes=0))

    killed = tmp_path / "killed"
    if where == "mid-epoch":  # a checkpoint after every update; killed in the middle of epoch 2
        settings = dict(settings, checkpoint_minutes=1e-6)
        kill_when = lambda s: s.epoch == 1 and s.update >= 2  # noqa: E731
    else:
        settings = dict(settings, checkpoint_minutes=0)
        kill_when = lambda s: s.epoch >= 1  # noqa: E731
    _run_until_killed(_cli_args(data, killed, **settings), killed, kill_when, bf16)
    state = load_checkpoint(killed / LAST)  # where the resumed run starts: 12 updates per epoch
    if where == "mid-epoch":
        assert state.epoch == 1 and 2 <= state.update < 12 and state.global_update == 12 + state.update
    else:
        assert state.epoch in (1, 2) and state.update == 0 and state.global_update == 12 * state.epoch
    resume_training(str(killed), checkpoint_minutes=0)

    ours, theirs = load_checkpoint(killed / LAST), load_checkpoint(reference / LAST)
    assert ours.epoch == theirs.epoch == 3
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in getattr(theirs, key).items():
            assert torch.equal(getattr(ours, key)[name], tensor), f"{key}.{name} differs after resume"
    assert [r["train_loss"] for r in ours.history] == [r["train_loss"] for r in theirs.history]


def _one_update(data: Path, run: Path, start: dict, **settings):
    """The loss and the weight change of one SGD update from the weights ``start`` on the first batch,
    and the trainer that made it."""
    # By default the full width at 64 px and batch 12: at 32 px the last stages are 1x1 and BatchNorm over
    # 6 values amplifies bf16 rounding until the update directions agree at a cosine of only 0.7.
    settings = dict(dict(model_args={}, batch_size=12, train_size=64), **settings)
    config = tiny_config(data, run, opt="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, ema=False, hflip=0.0,
                         scale=(1.0, 1.0), ratio=(1.0, 1.0), **settings)
    trainer = Trainer(config, setup_runtime("cpu", 1))
    trainer.model.load_state_dict(start)
    trainer.model.train()
    trainer.data.sampler.set_epoch(0, 0)
    torch.manual_seed(0)
    loss_sum, samples = trainer.step([next(iter(trainer.data.train_loader))])
    update = torch.cat([(p.detach() - start[n]).flatten() for n, p in trainer.model.named_parameters()])
    return loss_sum / samples, update, trainer


def test_a_bf16_training_step_matches_the_fp32_step_closely_but_not_exactly(data, tmp_path, monkeypatch):
    """Same weights (random, so every layer matters), same batch, one SGD update: the bf16 path must
    give the fp32 loss and update up to bf16 rounding (a wrong graph or a lost gradient would not),
    and must differ from it at all (else the flag did nothing)."""
    allow_bf16(monkeypatch)
    monkeypatch.setattr(InvertedResidual, "min_piece_elements", 0)  # blocks by piece too, at this small size
    start = randomized("mixnet_s", seed=5, num_classes=3).state_dict()
    loss32, update32, _ = _one_update(data, tmp_path / "fp32", start, amp="none")
    loss16, update16, _ = _one_update(data, tmp_path / "bf16", start, amp="bf16")
    assert loss16 == pytest.approx(loss32, rel=5e-2) and loss16 != loss32  # 2.6% measured
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.8  # 0.91 measured
    assert not torch.equal(update16, update32)


@ALONE
@COMPILES_TIMEOUT
def test_a_compiled_training_step_gives_the_eager_loss_and_update(data, tmp_path, monkeypatch):
    """torch.compile of the training forward (and so of its backward): the eager loss and update up to
    float reassociation, where a wrong graph or a lost gradient would be far off."""
    # Blocks by piece too, at this small size (compiled, the piece path once gave wrong gradients).
    monkeypatch.setattr(InvertedResidual, "min_piece_elements", 0)
    # The tiny model at 32 px: cold (a fresh CI machine) the full width's step took 9 minutes to compile.
    start = randomized("mixnet_s", seed=5, num_classes=3, **TINY_MODEL).state_dict()
    settings = dict(model_args=dict(TINY_MODEL), batch_size=6, train_size=32,
                    drop_rate=0.0, drop_path_rate=0.0)  # compiled code draws other random masks
    loss, update, _ = _one_update(data, tmp_path / "eager", start, **settings)
    compiled_loss, compiled_update, trainer = _one_update(data, tmp_path / "compiled", start, compile=True,
                                                          **settings)
    assert isinstance(trainer.train_forward, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled_loss == pytest.approx(loss, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(compiled_update, update, dim=0) > 0.9999
    assert (compiled_update - update).abs().max() <= 1e-2 * update.abs().max()  # 0.3% measured


def test_a_compiled_trainer_leaves_dynamo_room_for_a_graph_per_progressive_size(data, tmp_path, monkeypatch):
    """--compile keeps static shapes (one graph per training size, so a resumed run gets the uninterrupted
    run's kernels); dynamo falls back to eager after ``recompile_limit`` graphs, 8 by default."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    config = tiny_config(data, tmp_path, compile=True, epochs=40, train_size=128, min_train_size=32)
    Trainer(config, setup_runtime("cpu", 1))
    sizes = {progressive_size(e, 40, 32, 128) for e in range(40)}
    assert len(sizes) > 8 and torch._dynamo.config.recompile_limit > len(sizes)


# The keys of a checkpoint as mixnet 0.1's trainer wrote them (before TrainState).
V1_CHECKPOINT_KEYS = {"format", "version", "architecture", "config", "class_names", "epoch", "update",
                      "global_update", "state_dict", "state_dict_ema", "optimizer", "scaler", "scheduler",
                      "rng", "history", "best", "partial", "elapsed_seconds"}


def test_a_run_directory_in_the_first_checkpoint_format_resumes(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1))
    values = torch.load(run / LAST, weights_only=True)
    assert set(values) == V1_CHECKPOINT_KEYS - {"scheduler"}  # the one key no longer written
    assert set(values["best"]) == {"top1", "epoch", "source"}
    assert set(values["partial"]) == {"loss_sum", "samples", "bad_images", "train_seconds"}
    values["scheduler"] = dict(global_update=values["global_update"], updates_per_epoch=12)
    torch.save(values, run / LAST)
    with pytest.warns(UserWarning, match="changed settings epochs"):
        result = resume_training(str(run), epochs=2)
    assert result.completed and load_checkpoint(run / LAST).global_update == 24


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(MixNetError, match="no such checkpoint"):
        resume_training(str(tmp_path))
    (tmp_path / LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(MixNetError, match="not a readable training checkpoint"):
        resume_training(str(tmp_path))


def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "mixnet-train-checkpoint", "version": 1, "optimizer": RunsCode(marker)}, tmp_path / LAST)
    with pytest.raises(MixNetError, match="not a readable training checkpoint"):
        resume_training(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("setting,message", [
    ({"opt": "adam"}, "unknown opt 'adam'"), ({"sched": "onecycle"}, "unknown sched 'onecycle'"),
    ({"interpolation": "lanczos"}, "unknown interpolation 'lanczos'"), ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"model": "mixnet_q"}, "unknown model 'mixnet_q'"), ({"model_args": {"depth": 2}}, "unknown argument"),
    ({"scale": (0.9, 0.1)}, "scale must be two crop areas"), ({"label_smoothing": 1.5}, "label_smoothing must"),
    ({"train_size": 16}, "train_size must be >= 32"), ({"workers": -1}, "workers must be >= 0"),
    ({"threads": 0}, "threads must be >= 1"), ({"randaugment_magnitude": 20}, "randaugment_magnitude must"),
    ({"output": "a-file"}, "is a file, not a run directory")])
def test_settings_that_cannot_work_are_refused_before_the_run_starts(data, tmp_path, setting, message):
    (tmp_path / "a-file").write_text("not a run")
    setting = dict(setting)
    output = tmp_path / setting.pop("output", "run")
    with pytest.raises(MixNetError, match=re.escape(message)):
        train(tiny_config(data, output, **setting))
    assert not (tmp_path / "run").exists() and (tmp_path / "a-file").read_text() == "not a run"


@pytest.mark.parametrize("setting,message", [
    ({"lr_base_size": 0}, "lr_base_size must be > 0"),
    ({"sched": "step", "decay_epochs": 0}, "decay_epochs must be > 0"),
    ({"drop_rate": 1.5}, "drop_rate must be in [0, 1)"), ({"drop_path_rate": -0.1}, "drop_path_rate must be in"),
    ({"lr": -1.0}, "lr must be >= 0"), ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"ema_decay": 1.5}, "ema_decay must be in [0, 1]"), ({"clip_grad": -1.0}, "clip_grad must be > 0"),
    ({"randaugment_ops": -1}, "randaugment_ops must be >= 0"), ({"mixup": -0.2}, "mixup must be >= 0"),
    ({"warmup_epochs": -1.0}, "warmup_epochs must be >= 0"), ({"max_minutes": -1.0}, "max_minutes must be >= 0")])
def test_numeric_settings_that_would_crash_or_silently_mislead_are_refused_before_the_run_starts(
        data, tmp_path, setting, message):
    with pytest.raises(MixNetError, match=re.escape(message)):
        train(tiny_config(data, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_stopped_before_its_last_metrics_and_final_model_were_written_writes_them(
        data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1))
    exported = (run / "final" / "model.safetensors").read_bytes()
    resume_training(str(run))  # a complete, current export is left as it is
    assert (run / "final" / "model.safetensors").read_bytes() == exported
    (run / "final" / "config.json").unlink()  # killed after the last checkpoint, while exporting final/
    result = resume_training(str(run))
    assert result.completed and result.final_model == run / "final"
    assert (run / "final" / "config.json").is_file()
    assert (run / "final" / "model.safetensors").read_bytes() == exported
    shutil.rmtree(run / "final")  # killed before exporting it, or before writing the last metrics even
    (run / "metrics.csv").unlink()
    assert resume_training(str(run)).final_model == run / "final"
    assert [row["epoch"] for row in read_metrics(run)] == ["1"]
    assert (run / "final" / "model.safetensors").read_bytes() == exported


def test_resume_refuses_an_output_other_than_the_run_directory(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1))
    assert main(["train", "--resume", str(run), "--output", str(tmp_path / "elsewhere")]) == 2
    assert "a resumed run continues in its own directory" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
    assert resume_training(str(run), output=str(run)).completed  # the same directory, named again, is fine


def test_resume_refuses_a_recipe_or_starting_weights_it_would_not_apply(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1))
    with pytest.raises(MixNetError, match="a recipe cannot change a run being resumed"):
        resume_training(str(run), recipe="ra")
    assert load_checkpoint(run / LAST).config["recipe"] is None
    with pytest.raises(MixNetError, match="--pretrained only chooses a run's starting weights"):
        resume_training(str(run), pretrained="mixnet_s.imagenette")
    assert load_checkpoint(run / LAST).config["pretrained"] is None


def test_curves_of_epochs_without_validation_are_drawn_without_a_legend_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_curves(tmp_path / "curves.png", [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.9}])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_that_failed_before_its_first_update_may_be_started_again(data, tmp_path, monkeypatch):
    from mixnet.training import loop as training

    def broken_step(self, micro):
        raise RuntimeError("a setting that breaks the first step")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "step", broken_step)
        with pytest.raises(RuntimeError):
            train(tiny_config(data, run, epochs=1))
    assert load_checkpoint(run / LAST).global_update == 0  # what a fixed command finds there
    assert train(tiny_config(data, run, epochs=1)).completed


def test_resume_refuses_another_model_or_optimizer_and_fewer_epochs_than_trained(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=2))
    for change, message in (({"opt": "sgd"}, "opt cannot change when resuming"),
                            ({"model_args": {}}, "model_args cannot change when resuming"),
                            ({"epochs": 1}, "--epochs 1 is fewer than the 2 epochs already trained")):
        with pytest.raises(MixNetError, match=re.escape(message)):
            resume_training(str(run), **change)
    capsys.readouterr()
    result = resume_training(str(run))
    assert result.completed and result.epochs_done == 2
    assert "has already trained all 2 epochs" in capsys.readouterr().err


def test_a_stop_signal_checkpoints_the_update_reached_and_the_run_resumes_exactly(data, tmp_path, monkeypatch):
    from mixnet.training import loop as training

    settings = dict(epochs=2, checkpoint_minutes=0)  # no periodic checkpoints: only the signal saves
    reference = tmp_path / "reference"
    train(tiny_config(data, reference, **settings))
    real_step = training.Trainer.step

    def step_then_ctrl_c(self, micro):
        result = real_step(self, micro)
        if self.global_update == 12 + 2:  # epoch 2, third update
            os.kill(os.getpid(), signal.SIGINT)
        return result

    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "step", step_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(data, run, **settings))
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handlers are gone with it
    state = load_checkpoint(run / LAST)
    assert (state.epoch, state.update, state.global_update) == (1, 3, 15)
    resume_training(str(run))
    ours, theirs = load_checkpoint(run / LAST), load_checkpoint(reference / LAST)
    for name, tensor in theirs.state_dict.items():
        assert torch.equal(ours.state_dict[name], tensor), name
    assert [r["train_loss"] for r in ours.history] == [r["train_loss"] for r in theirs.history]


def test_train_refuses_to_overwrite_a_run(data, tmp_path, monkeypatch):
    allow_bf16(monkeypatch)
    run = tmp_path / "run"  # also exercises accumulation, clipping, bf16 autocast and cutmix
    result = train(tiny_config(data, run, epochs=1, accum_steps=2, clip_grad=1.0, amp="bf16", cutmix=1.0))
    assert result.history[0]["train_loss"] > 0 and load_checkpoint(run / LAST).global_update == 6
    with pytest.raises(MixNetError, match="already holds a training run"):
        train(tiny_config(data, run, epochs=1))


@pytest.mark.parametrize("setting", [{"sched_hold": 1.0}, {"sched_hold": -0.1}, {"opt_beta2": 1.0}])
def test_out_of_range_schedule_hold_or_beta2_is_refused_before_the_run_starts(data, tmp_path, setting):
    name, value = next(iter(setting.items()))
    with pytest.raises(MixNetError, match=rf"^{name} must be in \[0, 1\), got {value}$"):
        train(tiny_config(data, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_the_trainer_uses_the_held_schedule_and_beta2_it_is_given(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path / "run", epochs=4, sched_hold=0.5, opt_beta2=0.99),
                      setup_runtime("cpu", 1))
    assert trainer.schedule(2.0) == trainer.lr > trainer.schedule(3.0)  # held to t=2, then down
    assert all(group["betas"] == (0.9, 0.99) for group in trainer.optimizer.param_groups)


def test_progressive_resizing_starts_small_grows_through_the_middle_and_ends_at_the_full_size():
    for epochs in (4, 5, 20, 200):
        sizes = [progressive_size(e, epochs, 96, 128) for e in range(epochs)]
        quarter = epochs // 4
        assert sizes[:quarter] == [96] * quarter and sizes[epochs - quarter:] == [128] * quarter, sizes
        assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes), sizes
        if epochs >= 20:
            assert len(set(sizes)) == 5, sizes  # 96, 104, ..., 128: the middle half passes every step
    assert [progressive_size(e, 5, None, 128) for e in range(5)] == [128] * 5
    assert progressive_size(0, 1, 96, 128) == 128  # a one-epoch run ends, so trains, at the full size


def test_a_progressive_run_feeds_the_network_the_scheduled_sizes_and_records_them(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path / "run", epochs=4, train_size=48, min_train_size=32, ema=False),
                      setup_runtime("cpu", 1))
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args: seen.append((trainer.epoch, m.training,
                                                                         tuple(args[0].shape[-2:]))))
    trainer.run()
    trained = sorted({(epoch, size) for epoch, training, size in seen if training})
    assert trained == [(0, (32, 32)), (1, (32, 32)), (2, (48, 48)), (3, (48, 48))]
    assert {size for _, training, size in seen if not training} == {(32, 32)}  # eval_size, unchanged
    assert [int(r["train_size"]) for r in read_metrics(tmp_path / "run")] == [32, 32, 48, 48]


@pytest.mark.parametrize("size", [16, 64])
def test_a_progressive_start_outside_32_to_train_size_is_refused(data, tmp_path, size):
    with pytest.raises(MixNetError, match=rf"^min_train_size must be between 32 and train_size \(48\), got {size}$"):
        train(tiny_config(data, tmp_path / "run", train_size=48, min_train_size=size))
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_without_native_bf16_is_a_clear_error(data, tmp_path, monkeypatch):
    from mixnet.deploy import runtimes

    monkeypatch.setattr(runtimes, "cpu_flags", lambda cpuinfo=None: {"avx2", "avx512f"})
    with pytest.raises(MixNetError, match="--amp bf16 needs a CPU with avx512_bf16 or amx_bf16"):
        train(tiny_config(data, tmp_path / "run", amp="bf16"))
    assert not (tmp_path / "run").exists()


def test_max_minutes_stops_with_a_checkpoint_that_resumes(data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(data, run, epochs=1, max_minutes=1e-9))
    assert not result.completed and not (run / "final").exists()
    assert load_checkpoint(run / LAST).global_update == 0
    assert resume_training(str(run), max_minutes=None).completed
    assert (run / "final" / "model.safetensors").is_file()


def test_the_command_exits_3_at_max_minutes_and_0_when_done_with_json_a_script_can_read(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_cli_args(data, run, epochs=2, batch_size=6, train_size=32, eval_size=32, workers=0,
                                     lr=3e-3, max_minutes=1e-9), "--json"]) == 3
    stopped = json.loads(capsys.readouterr().out)
    assert (stopped["completed"], stopped["epochs"], stopped["epochs_done"], stopped["final_model"]) == \
        (False, 2, 0, None)
    assert main(["train", "--resume", str(run), "--max-minutes", "0", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["completed"], done["epochs_done"], done["final_model"]) == (True, 2, str(run / "final"))
    rows = read_metrics(run)
    best = max(rows, key=lambda r: max(float(r["val_top1"]), float(r["ema_val_top1"])))
    assert done["best_top1"] == pytest.approx(max(float(best["val_top1"]), float(best["ema_val_top1"])), abs=1e-4)
    assert [r["epoch"] for r in done["history"]] == [1, 2] and done["best_source"] in ("raw", "ema")
@HEAVY
def test_torchrun_two_processes_on_cpu(data, tmp_path):
    run = tmp_path / "ddp"
    args = _cli_args(data, run, epochs=1, batch_size=3, train_size=32, eval_size=32, workers=0, lr=3e-3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "mixnet", "train", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 6
    state = load_checkpoint(run / LAST)
    model = create_model("mixnet_s", num_classes=3, **TINY_MODEL)
    model.load_state_dict(state.state_dict)  # rank 0's checkpoint: plain keys, no "module." prefix
    assert len(read_metrics(run)) == 1
    # 72 training images over 2 ranks x 3 per batch: 12 updates of 6 images, all counted
    assert state.global_update == 12
    assert load_model(run / "final").num_classes == 3
@HEAVY
def test_two_processes_at_batch_3_equal_one_process_at_batch_6_and_only_rank_0_writes(data, tmp_path):
    import torch.multiprocessing as mp

    from ddp_worker import train_as_rank

    # Deterministic: no augmentation (full-image crops, no flip), no dropout, BatchNorm frozen (its
    # batch statistics would differ between 3 and 6 images), no EMA warm-up differences.
    values = tiny_config(data, tmp_path / "single", epochs=1, batch_size=6, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                         hflip=0.0, drop_rate=0.0, drop_path_rate=0.0, freeze_bn=True, opt="sgd", lr=0.05,
                         deterministic=False).to_dict()
    train(TrainConfig.from_dict(values))
    two = dict(values, output=str(tmp_path / "two"), batch_size=3)
    mp.start_processes(train_as_rank, args=(2, free_port(), two), nprocs=2, start_method="spawn")

    single, pair = load_checkpoint(tmp_path / "single" / LAST), load_checkpoint(tmp_path / "two" / LAST)
    assert single.global_update == pair.global_update == 12
    torch.manual_seed(mix_seed(values["seed"], 0xC0FFEE))  # the initial weights, as the trainer draws them
    start = create_model("mixnet_s", num_classes=3, **TINY_MODEL).state_dict()
    for name, tensor in single.state_dict.items():
        if not tensor.is_floating_point():
            continue
        assert torch.allclose(pair.state_dict[name], tensor, rtol=1e-4, atol=1e-5), name
    # Unsynchronised gradients (each rank stepping on its own 3 images) would land far from these
    # weights: training moved them much further than the two runs differ.
    moved = sum(float((single.state_dict[k] - start[k]).abs().sum()) for k in start if start[k].is_floating_point()
                and "running" not in k)
    differ = sum(float((single.state_dict[k] - pair.state_dict[k]).abs().sum()) for k in start
                 if start[k].is_floating_point() and "running" not in k)
    assert moved > 1000 * differ


def test_resuming_with_more_epochs_recomputes_the_schedule_from_the_same_point(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=2, lr=0.01, min_lr=0.0, warmup_epochs=0, sched="cosine"))
    with pytest.warns(UserWarning, match="changed settings epochs"):
        result = resume_training(str(run), epochs=4)
    assert result.completed and [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    updates = 12  # 72 images / batch 6
    for row in result.history:
        # the lr of an epoch's last update, by the cosine formula: lengths 2 then (resumed) 4
        epochs = 2 if row["epoch"] <= 2 else 4
        t = row["epoch"] - 1 + (updates - 1) / updates
        expected = 0.5 * 0.01 * (1 + math.cos(math.pi * t / epochs))
        assert row["lr"] == pytest.approx(expected, abs=1e-6), row  # metrics keep 6 decimals


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_class_folder_is_skipped_with_a_warning(data, tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    (root / "train" / "empty").mkdir()
    run = tmp_path / "run"
    train(tiny_config(root, run, epochs=1))
    assert "empty class folder" in capsys.readouterr().err
    assert load_checkpoint(run / LAST).class_names == ["class0", "class1", "class2"]


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "val" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = tmp_path / "run"
    train(tiny_config(root, run, epochs=1, batch_size=73))  # one batch holding every training image
    err = capsys.readouterr().err
    assert "broken.png" in err and "broken.jpg" in err
    assert read_metrics(run)[0]["bad_images"] == "2"  # a count, not "2.0"


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_folder_of_which_no_image_can_be_read_stops_the_run_rather_than_scoring_nothing(tmp_path, capsys, split):
    root = make_dataset(tmp_path / "data")
    for image in (root / split).rglob("*.png"):
        image.write_bytes(b"not an image")
    with pytest.raises(MixNetError, match="could be read") as failure:
        train(tiny_config(root, tmp_path / "run", epochs=1))
    assert str(root / split) in str(failure.value)
    assert not (tmp_path / "run" / "final").exists()


def test_val_class_missing_from_train_is_reported_and_not_scored(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    extra = root / "val" / "unseen"
    extra.mkdir()
    Image.new("RGB", (36, 36), (128, 128, 128)).save(extra / "x.png")
    run = tmp_path / "run"
    train(tiny_config(root, run, epochs=1))
    assert "unseen" in capsys.readouterr().err
    assert load_checkpoint(run / LAST).class_names == ["class0", "class1", "class2"]


def test_resuming_on_a_folder_whose_classes_differ_from_the_runs_warns_of_each_difference(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1))
    capsys.readouterr()
    resume_training(str(run))
    assert "the run's classes" not in capsys.readouterr().err
    moved = tmp_path / "moved"  # the dataset moved, and one class was renamed on the way
    shutil.copytree(data, moved)
    for split in ("train", "val"):
        (moved / split / "class2").rename(moved / split / "other")
    resume_training(str(run), data=str(moved))
    err = capsys.readouterr().err
    assert f"1 of the run's classes have no training images in {moved / 'train'}: class2" in err
    assert f"1 class folder(s) of {moved / 'train'} are not among the run's classes and are ignored" in err


def test_a_training_class_missing_from_val_is_reported(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    shutil.rmtree(root / "val" / "class2")
    train(tiny_config(root, tmp_path / "run", epochs=1))
    assert "1 training class(es) have no folder in" in capsys.readouterr().err


def test_a_single_class_or_missing_folders_are_refused(tmp_path):
    root = make_dataset(tmp_path / "one", classes=COLOURS[:1])
    with pytest.raises(MixNetError, match="at least 2"):
        train(tiny_config(root, tmp_path / "run"))
    with pytest.raises(MixNetError, match="no such directory"):
        train(tiny_config(tmp_path / "nowhere", tmp_path / "run2"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    from mixnet.training import loop as training

    run = tmp_path / "run"
    calls = {"n": 0}
    real_loss = training.Trainer.loss

    def loss_turning_nan(self, logits, targets):
        calls["n"] += 1
        loss = real_loss(self, logits, targets)
        return loss * float("nan") if calls["n"] > 14 else loss  # epoch 1 has 12 updates

    monkeypatch.setattr(training.Trainer, "loss", loss_turning_nan)
    with pytest.raises(NonFiniteLoss, match="NaN") as info:
        train(tiny_config(data, run, epochs=3))
    assert str(run / LAST) in str(info.value)
    state = load_checkpoint(run / LAST)
    assert state.epoch == 1
    assert all(torch.isfinite(t).all() for t in state.state_dict.values() if t.is_floating_point())


def test_weights_gone_nan_behind_a_finite_loss_never_replace_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    step = Trainer.step

    def step_then_blow_up(self, micro):  # the epoch's last update leaves NaN weights, its loss was finite
        result = step(self, micro)
        if self.epoch == 0 and self.update == self.data.updates_per_epoch - 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(Trainer, "step", step_then_blow_up)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="the weights became NaN/infinite by the end of epoch 1"):
        train(tiny_config(data, run, epochs=2))
    state = load_checkpoint(run / LAST)
    assert all(torch.isfinite(t).all() for t in state.state_dict.values() if t.is_floating_point())
    assert not (run / BEST).exists() and not (run / "final").exists()


def test_full_disk_on_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    from mixnet.training import loop as training

    run = tmp_path / "run"
    saves = {"n": 0}
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # the initial checkpoint and epoch 1's succeed
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", save_until_disk_full)
    with pytest.raises(MixNetError, match="No space left on device"):
        train(tiny_config(data, run, epochs=3))
    monkeypatch.undo()
    assert load_checkpoint(run / LAST).epoch == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_finetune_starts_from_a_run_with_a_new_head(data, tmp_path):
    source = tmp_path / "source"
    train(tiny_config(data, source, epochs=1))
    root = make_dataset(tmp_path / "two", classes=COLOURS[:2])
    run = tmp_path / "finetuned"
    train(tiny_config(root, run, pretrained=str(source / "final"), epochs=1))
    start = load_checkpoint(source / LAST).state_dict
    tuned = load_checkpoint(run / LAST)
    assert tuned.class_names == ["class0", "class1"] and tuned.state_dict["classifier.weight"].shape[0] == 2
    # the trunk started from the source weights: after one short epoch it is still close to them
    trunk = "conv_stem.weight"
    assert torch.dist(tuned.state_dict[trunk], start[trunk]) < 0.5 * torch.dist(
        create_model("mixnet_s", num_classes=2, **TINY_MODEL).state_dict()[trunk], start[trunk])


def test_recipes_fill_settings_and_overrides_win():
    ra = TrainConfig.from_recipe("ra", epochs=3)
    assert (ra.opt, ra.opt_eps, ra.lr_base, ra.decay_rate, ra.decay_epochs, ra.ema_decay, ra.epochs) == \
        ("rmsproptf", 1e-3, 0.016, 0.969, 2.4, 0.9999, 3)
    assert TrainConfig.from_recipe("finetune", model="mixnet_m").pretrained == "mixnet_m"
    assert TrainConfig.from_recipe("small-data").train_size == 112
    with pytest.raises(MixNetError, match="unknown recipe"):
        TrainConfig.from_recipe("fast")
    with pytest.raises(MixNetError, match="unknown training setting"):
        TrainConfig.from_recipe(None, learning_rate=1.0)


def test_a_short_run_of_any_recipe_warms_up_for_a_tenth_of_it_unless_told():
    assert TrainConfig.from_recipe(None, epochs=1).warmup_epochs == pytest.approx(0.1)
    assert TrainConfig.from_recipe("finetune", epochs=3).warmup_epochs == pytest.approx(0.3)
    assert TrainConfig.from_recipe("finetune").warmup_epochs == 1  # its own 10 epochs: the recipe's
    assert TrainConfig.from_recipe("ra", epochs=30).warmup_epochs == 3
    assert TrainConfig.from_recipe("finetune", epochs=3, warmup_epochs=2).warmup_epochs == 2


def test_small_data_settings_follow_the_run_length_unless_given():
    short, middle, long = (TrainConfig.from_recipe("small-data", epochs=e) for e in (5, 12, 48))
    # the 5-epoch values of docs/small-data.md
    assert (short.warmup_epochs, short.lr_base, short.scale, short.sched_hold, short.opt_beta2) == \
        (0.5, 0.024, (0.6, 1.0), 0.5, 0.99)
    # the built-in model's first stage, unchanged
    assert (long.warmup_epochs, long.lr_base, long.scale, long.sched_hold, long.opt_beta2) == \
        (2, 0.03, (0.35, 1.0), 0.0, 0.999)
    assert 0.024 < middle.lr_base < 0.03 and middle.warmup_epochs == pytest.approx(1.2)
    assert 0.35 < middle.scale[0] < 0.6 and 0 < middle.sched_hold < 0.5 and 0.99 < middle.opt_beta2 < 0.999
    # no dropout or drop-path at 5 epochs, the recipe's from 30 on
    assert (short.drop_rate, short.drop_path_rate, long.drop_rate, long.drop_path_rate) == (0, 0, 0.2, 0.05)
    assert 0 < middle.drop_rate < 0.2 and 0 < middle.drop_path_rate < 0.05
    assert (short.opt, middle.opt, TrainConfig.from_recipe("small-data", epochs=29).opt, long.opt) == \
        ("muon", "muon", "muon", "adamw")
    # 3x the recipe's weight decay wherever Muon trains, the recipe's 0.05 from 30 epochs on
    assert (short.weight_decay, middle.weight_decay, TrainConfig.from_recipe("small-data", epochs=29).weight_decay,
            long.weight_decay) == (0.15, 0.15, 0.15, 0.05)
    assert TrainConfig.from_recipe("small-data", epochs=5, weight_decay=0.05).weight_decay == 0.05
    given = TrainConfig.from_recipe("small-data", epochs=5, lr_base=0.02, warmup_epochs=0, scale=(0.08, 1.0),
                                    opt="adamw", drop_rate=0.3)
    assert (given.lr_base, given.warmup_epochs, given.scale, given.sched_hold, given.opt, given.drop_rate) == \
        (0.02, 0, (0.08, 1.0), 0.5, "adamw", 0.3)
    assert TrainConfig.from_recipe("small-data").lr_base == 0.03  # the recipe's own length: 50 epochs


def test_train_help_groups_options_and_shows_each_recipes_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    help_text = capsys.readouterr().out
    groups = [title + ":" for title in ("model and data", "optimisation", "augmentation and resolution",
                                        "weight EMA", "precision and system")]
    positions = [help_text.index("\n" + g + "\n") for g in groups]
    assert positions == sorted(positions)
    epochs_line = next(line for line in help_text.splitlines() if line.strip().startswith("--epochs"))
    assert f"ra: {TrainConfig.from_recipe('ra').epochs}" in epochs_line
    assert f"small-data: {TrainConfig.from_recipe('small-data').epochs}" in epochs_line
    assert "finetune" not in epochs_line  # the finetune recipe keeps the generic default
    assert "[--ema | --no-ema]" in help_text and "--opt {sgd,adamw,rmsproptf,muon}" in help_text


def test_train_help_says_what_an_unset_lr_pretrained_or_time_limit_means_and_which_optimizers_use_what(capsys):
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    def option(flag):
        return help_text[help_text.index(f" {flag} {flag.lstrip('-').upper().replace('-', '_')} "):][:300]

    assert "--lr-base x global batch / --lr-base-size" in option("--lr")
    assert "finetune: the --model's published weights" in option("--pretrained")
    assert "exit 3" in option("--max-minutes") and "0: no limit" in option("--max-minutes")
    assert option("--momentum").startswith(" --momentum MOMENTUM sgd's and rmsproptf's (adamw uses beta1")
    assert "sgd and rmsproptf have none" in option("--opt-beta2")
