"""Optimizers and LR schedules: fallbacks, clear errors, schedule shapes."""
import importlib.util
import math
import sys

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.training.config import TrainConfig
from sdlora.training.optim import build_optimizer, build_scheduler, lr_lambda


def _groups():
    return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}]


def test_adamw8bit_falls_back_to_adamw_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # as if it were not installed
    seen = []
    opt, desc = build_optimizer("adamw8bit", _groups(), TrainConfig(), warn=seen.append)
    assert isinstance(opt, torch.optim.AdamW) and desc.startswith("torch.optim.adamw.AdamW")
    assert len(seen) == 1 and "AdamW8bit is not available" in seen[0]


def test_adamw8bit_is_bitsandbytes_when_installed():
    pytest.importorskip("bitsandbytes")         # a test dependency (pyproject [test]); skipped only outside it
    seen = []
    opt, desc = build_optimizer("adamw8bit", _groups(), TrainConfig(), warn=seen.append)
    assert type(opt).__name__ == "AdamW8bit" and desc.startswith("bitsandbytes.optim.AdamW8bit") and seen == []


def test_prodigy_needs_its_package():
    if importlib.util.find_spec("prodigyopt") is None:
        with pytest.raises(SdloraError, match="pip install prodigyopt"):
            build_optimizer("prodigy", _groups(), TrainConfig())
    else:
        opt, desc = build_optimizer("prodigy", _groups(), TrainConfig())
        assert type(opt).__name__ == "Prodigy" and desc.startswith("prodigyopt.Prodigy")


def test_adamw_uses_the_configured_hyperparameters():
    cfg = TrainConfig(weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)
    opt, _ = build_optimizer("adamw", _groups(), cfg)
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 and g["lr"] == 1e-3


def test_schedules_warm_up_then_follow_their_shape():
    total, warm = 100, 10
    const, cos, lin = (lr_lambda(k, warm, total) for k in ("constant", "cosine", "linear"))
    assert [round(const(s), 3) for s in (0, 4, 9)] == [round((s + 1) / 11, 3) for s in (0, 4, 9)]
    assert const(10) == const(99) == 1.0
    assert cos(10) == 1.0 and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
    assert lin(10) == 1.0 and lin(55) == pytest.approx(0.5) and lin(100) == 0.0
    assert math.isclose(cos(32), 0.5 * (1 + math.cos(math.pi * 22 / 90)))
    opt, _ = build_optimizer("adamw", _groups(), TrainConfig())
    sched = build_scheduler(opt, "cosine", warm, total)
    for _ in range(55):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
