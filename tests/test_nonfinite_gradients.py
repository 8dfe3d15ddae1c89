"""train.on_nonfinite looks at the gradients too: an infinite gradient entry with a finite loss.

Without the check, clip_grad_norm_ sees a total norm of inf, scales every gradient by 0 (inf * 0 = NaN
in the bad entry) and Adam writes NaN into that parameter; every later loss is NaN.
"""

import math

import pytest
import torch

from conftest import tiny_trainer
from deepunroll.train import checkpoint
from deepunroll.train.trainer import NonFiniteGradientError, NonFiniteLossError


def inject_inf_gradient(model, at_backward, value=math.inf):
    """On the at_backward-th backward pass, one entry of the first parameter's gradient becomes ``value``;
    the loss is untouched. Returns {"backward": number of backward passes seen}."""
    param = next(p for p in model.parameters() if p.requires_grad)
    seen = {"backward": 0}

    def hook(grad):
        seen["backward"] += 1
        if seen["backward"] != at_backward:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    param.register_hook(hook)
    return seen


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_skip_leaves_parameters_finite_after_a_nonfinite_gradient(tiny_toy, tmp_path, value):
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path, epochs=2, on_nonfinite="skip")
    seen = inject_inf_gradient(trainer.model, at_backward=3, value=value)
    history = trainer.fit(datasets["train"], datasets["val"])
    assert seen["backward"] == 12  # 2 epochs x 6 steps: the loss stayed finite, every step ran backward
    assert trainer.skipped_steps == 1
    assert all_finite(trainer.model)
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in history)
    assert checkpoint.load(trainer.last_path)["skipped_steps"] == 1


def test_skipped_step_is_not_taken(tiny_toy, tmp_path):
    """Adam counts 11 of the 12 steps: the skipped one changed neither parameters nor optimizer state."""
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path, epochs=2, on_nonfinite="skip")
    inject_inf_gradient(trainer.model, at_backward=3)
    taken = []
    trainer.optimizer.register_step_pre_hook(lambda *_: taken.append(1))
    trainer.fit(datasets["train"], datasets["val"])
    assert len(taken) == 11
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 11


def test_stop_raises_on_a_nonfinite_gradient_with_a_finite_loss(tiny_toy, tmp_path):
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path, epochs=2)
    inject_inf_gradient(trainer.model, at_backward=6 + 2)  # 6 steps per epoch: epoch 2, step 2
    with pytest.raises(NonFiniteGradientError,
                       match=r"non-finite gradient \(norm inf\) at epoch 2, step 2; the last good checkpoint is "
                             r".*last.pt"):
        trainer.fit(datasets["train"], datasets["val"])
    assert issubclass(NonFiniteGradientError, NonFiniteLossError)  # one except clause catches both
    kept = checkpoint.load(trainer.last_path)
    assert kept["epoch"] == 1 and all(torch.isfinite(t).all() for t in kept["model"].values())
    assert all_finite(trainer.model)  # the bad gradient was never applied


def test_finite_gradients_train_exactly_as_before(tiny_toy, tmp_path):
    """The check is read off clip_grad_norm_'s total norm: a normal run takes every step."""
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path, epochs=2, on_nonfinite="stop")
    trainer.fit(datasets["train"], datasets["val"])
    assert trainer.skipped_steps == 0
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 12
