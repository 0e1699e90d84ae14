"""The trainer's log window: its KD columns come from its last KD step, also when the window
ends past the switch to plain training (a window of --log-interval steps straddling n_kd)."""

from __future__ import annotations

from salt_megatron.training.trainer import StepResult, kd_columns


def _step(kd: bool, weight: float, gate_on: float) -> StepResult:
    return StepResult(
        loss=3.0, lm_loss=2.5 if kd else 3.0, kd_loss=4.0 if kd else 0.0, top1_agree=0.25,
        kd_gate_on=gate_on, kd_weight=weight, kd_phase=kd, grad_norm=1.0, lr=1e-3, tokens=64,
        updated=True, seconds=0.1, batch_size=4,
    )  # fmt: skip


def test_window_straddling_the_switch_shows_its_last_kd_step() -> None:
    window = [_step(True, 0.8, 0.6), _step(True, 0.7, 0.5), _step(False, 0.0, 0.0)]
    assert kd_columns(window, gate=True) == {
        "lm_loss": 2.5, "kd_loss": 4.0, "kd_weight": 0.7, "top1_agree": 0.25, "kd_gate_on": 0.5,
    }  # fmt: skip
    assert "kd_gate_on" not in kd_columns(window, gate=False)


def test_plain_window_has_no_kd_columns() -> None:
    assert kd_columns([_step(False, 0.0, 0.0)] * 3, gate=True) == {}
