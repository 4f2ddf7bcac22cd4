"""Stop conditions on scripted loss curves: when they stop, which model they keep, what they
print."""

import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from ginjax import ml


def run_curve(condition, train_curve, val_curve=None, max_epochs=100):
    """Drive `condition` the way `train` does; models are the strings 'm0', 'm1', ...

    Returns the epoch count at which it stopped (None if it never did)."""
    train_loss = val_loss = None
    for epoch in range(max_epochs):
        if condition.stop(f"m{epoch}", epoch, train_loss, val_loss, 0.5):
            return epoch
        if epoch >= len(train_curve):
            return None
        train_loss = train_curve[epoch]
        val_loss = None if val_curve is None else val_curve[epoch]
    return None


def test_epoch_stop_stops_after_exactly_n_epochs_keeping_latest_model():
    condition = ml.EpochStop(3)
    assert run_curve(condition, [5.0, 4.0, 3.0, 2.0, 1.0]) == 3
    assert condition.best_model == "m3"


def test_epoch_stop_zero_epochs_stops_before_training():
    assert run_curve(ml.EpochStop(0), [1.0]) == 0


def test_train_loss_patience_and_min_delta_on_hand_checked_curve():
    # improvements need a drop of more than 0.1 below the best: epochs 1, 2 and 5 improve;
    # after epoch 5 (best 0.5) three epochs without improvement exceed patience 2 -> stop at 8
    curve = [1.0, 0.8, 0.75, 0.72, 0.5, 0.49, 0.48, 0.47, 0.1]
    condition = ml.TrainLoss(patience=2, min_delta=0.1)
    assert run_curve(condition, curve) == 8
    assert condition.best_model == "m5"  # the model after epoch 5 (stop called with epoch 5)
    assert condition.best_train_loss == pytest.approx(0.5)


def test_train_loss_zero_patience_stops_at_first_plateau_and_accepts_jax_scalars():
    curve = [jnp.float32(3.0), jnp.float32(2.0), jnp.float32(2.0), jnp.float32(1.0)]
    condition = ml.TrainLoss()
    assert run_curve(condition, curve) == 3
    assert condition.best_model == "m2"


def test_val_loss_ignores_train_loss_and_keeps_best_validation_model():
    train = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2]  # always improving: must not matter
    val = [2.0, 1.0, 1.5, 1.2, 1.1, 1.3, 0.1]
    condition = ml.ValLoss(patience=3)
    assert run_curve(condition, train, val) == 6
    assert condition.best_model == "m2"
    assert condition.best_val_loss == pytest.approx(1.0)


def test_val_loss_without_validation_never_stops():
    assert run_curve(ml.ValLoss(), [3.0, 2.0, 2.0, 2.0], None) is None


def test_any_stop_stops_on_first_condition_and_keeps_first_conditions_model():
    val = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    early = ml.ValLoss(patience=1)
    cap = ml.EpochStop(10)
    condition = ml.AnyStop([early, cap])
    assert run_curve(condition, [1.0] * 7, val) == 4
    assert condition.best_model == "m2"
    # both conditions were asked every epoch, not just until one answered
    assert early.epochs_since_best == 2
    assert cap.best_model == "m4"

    capped = ml.AnyStop([ml.ValLoss(patience=50), ml.EpochStop(3)])
    assert run_curve(capped, [1.0] * 7, [1.0 - 0.1 * i for i in range(7)]) == 3


def test_epoch_stop_verbose_levels_print_expected_epochs(capsys):
    run_curve(ml.EpochStop(4, verbose=2), [0.5, 0.25, 0.125, 0.0625])
    lines = capsys.readouterr().out.strip().splitlines()
    # epoch 0 has no loss yet, so nothing is printed for it
    assert [line.split()[1] for line in lines] == ["1", "2", "3", "4"]
    assert lines[1].startswith("Epoch 2 Train: 0.2500000")
    assert "Epoch time: 0.50000" in lines[1]

    run_curve(ml.EpochStop(20, verbose=1), [1.0] * 20, [2.0] * 20)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split()[1]) for line in lines] == list(range(2, 21, 2))
    assert "Val: 2.0000000" in lines[0]

    run_curve(ml.EpochStop(5, verbose=0), [1.0] * 5)
    assert capsys.readouterr().out == ""


def test_plateau_verbose_prints_only_improvements(capsys):
    run_curve(ml.TrainLoss(patience=5, verbose=1), [3.0, 2.0, 2.5, 1.0, 1.5])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split()[1]) for line in lines] == [1, 2, 4]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ml.EpochStop(5, verbose=3), "`verbose` (=3)"),
        (lambda: ml.EpochStop(-1), "`epochs` (=-1)"),
        (lambda: ml.EpochStop(2.5), "`epochs` (=2.5)"),
        (lambda: ml.TrainLoss(patience=-2), "`patience` (=-2)"),
        (lambda: ml.ValLoss(min_delta=-0.1), "`min_delta` (=-0.1)"),
        (lambda: ml.AnyStop([]), "`stop_conditions` (=[])"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_any_stop_rejects_non_conditions():
    with pytest.raises(TypeError, match="StopCondition"):
        ml.AnyStop([ml.EpochStop(2), "not a condition"])


def reference_plateau_stop(curve, patience, min_delta):
    """Stop epoch and best index by a direct reading of the rule, for comparison."""
    best, best_index, streak = float("inf"), None, 0
    for i, loss in enumerate(curve):
        if loss < best - min_delta:
            best, best_index, streak = loss, i, 0
        else:
            streak += 1
        if streak > patience:
            return i + 1, best_index  # loss i is reported to the condition at epoch i + 1
    return None, best_index


@settings(max_examples=60, deadline=None)
@given(
    curve=st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=30),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_train_loss_matches_reference_rule_on_random_curves(curve, patience, min_delta):
    condition = ml.TrainLoss(patience=patience, min_delta=min_delta)
    stopped = run_curve(condition, curve)
    expected_stop, best_index = reference_plateau_stop(curve, patience, min_delta)
    assert stopped == expected_stop
    assert condition.best_model == f"m{best_index + 1}"
