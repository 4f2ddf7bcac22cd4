"""ginjax.ml training: batching, train/train_dl/train_step/evaluate, save/load, autoregression,
data parallel over two CPU devices (in a subprocess), progress output."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ginjax.geometric as geom
from ginjax import ml

REPO = pathlib.Path(__file__).resolve().parents[1]
D = 2
N = 4
SCALAR, VECTOR = ((), 0), ((False,), 0)


class ChannelMix(eqx.Module):
    """Per-key linear channel mixing: an equivariant map simple enough to check by hand."""

    weights: dict

    def __call__(self, x, aux_data=None):
        out = x.empty()
        for key, block in x.items():
            out.append(key[0], key[1], jnp.tensordot(self.weights[key], block, axes=1))
        return out, aux_data


class NormThenScale(eqx.Module):
    """Batch norm over the scalar channels, then a learned scale and shift: uses aux_data."""

    norm: eqx.nn.BatchNorm
    scale: jax.Array
    shift: jax.Array

    def __init__(self, channels):
        self.norm = eqx.nn.BatchNorm(channels, axis_name="batch", mode="batch")
        self.scale = jnp.ones((channels, 1, 1))
        self.shift = jnp.zeros((channels, 1, 1))

    def __call__(self, x, aux_data=None):
        normed, aux_data = self.norm(x[SCALAR], aux_data)
        out = x.empty()
        out.append(SCALAR[0], SCALAR[1], self.scale * normed + self.shift)
        return out, aux_data


def random_weights(rng, scale=1.0):
    return {
        SCALAR: jnp.asarray(scale * rng.normal(size=(2, 2)), jnp.float32),
        VECTOR: jnp.asarray(scale * rng.normal(size=(1, 1)), jnp.float32),
    }


def random_inputs(rng, n_samples):
    return geom.MultiImage(
        {
            SCALAR: jnp.asarray(rng.normal(size=(n_samples, 2, N, N)), jnp.float32),
            VECTOR: jnp.asarray(rng.normal(size=(n_samples, 1, N, N, D)), jnp.float32),
        },
        D,
    )


def regression_problem(rng, n_train=24, n_val=8):
    """X -> Y by a hidden ChannelMix; returns train and validation data and a fresh model."""
    teacher = ChannelMix(random_weights(rng))
    apply = jax.vmap(lambda x: teacher(x)[0])
    X, X_val = random_inputs(rng, n_train), random_inputs(rng, n_val)
    return X, apply(X), X_val, apply(X_val), ChannelMix(random_weights(rng, 0.1))


def ids_multi_image(n_samples, offset=0.0):
    """Sample i holds the value i + offset everywhere, so a batch shows which samples it has."""
    ids = jnp.arange(n_samples, dtype=jnp.float32) + offset
    return geom.MultiImage(
        {SCALAR: jnp.broadcast_to(ids[:, None, None, None], (n_samples, 1, N, N))}, D
    )


def sample_ids(batch):
    return [int(v) for v in np.asarray(batch[SCALAR][:, 0, 0, 0])]


MAPPER = ml.Mapper([geom.Losses.SMSE])


# ---- batching --------------------------------------------------------------------------------


def test_get_batches_covers_every_sample_once_and_keeps_x_y_aligned():
    X, Y = ids_multi_image(11), ids_multi_image(11, offset=100.0)
    X_batches, Y_batches = ml.get_batches((X, Y), 3, jax.random.PRNGKey(0))
    assert len(X_batches) == len(Y_batches) == 3  # 11 // 3, the remainder is dropped
    seen = [i for batch in X_batches for i in sample_ids(batch)]
    assert len(seen) == len(set(seen)) == 9 and set(seen) <= set(range(11))
    for xb, yb in zip(X_batches, Y_batches):
        assert [i + 100 for i in sample_ids(xb)] == sample_ids(yb)
        assert xb[SCALAR].shape == (3, 1, N, N)  # no device axis is added

    ordered = ml.get_batches(X, 4, None)
    assert len(ordered) == 1 and [sample_ids(b) for b in ordered[0]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    other = ml.get_batches(X, 11, jax.random.PRNGKey(1))[0][0]
    assert sorted(sample_ids(other)) == list(range(11)) and sample_ids(other) != list(range(11))


def test_train_reshuffles_every_epoch_and_visits_all_samples():
    X, Y = ids_multi_image(8), ids_multi_image(8)
    epochs = []

    def record(model, x, y, aux_data):
        # a callback, so that every call (not only the trace) reports the ids it was given
        jax.debug.callback(lambda ids: epochs.append(np.asarray(ids)), x[SCALAR][:, 0, 0, 0])
        return jnp.mean(model.weights[SCALAR]) * 0.0 + jnp.sum(x[SCALAR]) * 0.0, aux_data

    model = ChannelMix({SCALAR: jnp.ones((1, 1))})
    ml.train(X, Y, record, model, jax.random.PRNGKey(3), ml.EpochStop(3), 4, optax.sgd(0.1))
    jax.effects_barrier()
    per_epoch = [np.concatenate(epochs[i : i + 2]).astype(int).tolist() for i in (0, 2, 4)]
    assert all(sorted(order) == list(range(8)) for order in per_epoch)
    assert len({tuple(order) for order in per_epoch}) > 1  # a fresh order each epoch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "`batch_size` (=0)"),
        (dict(batch_size=12), "`batch_size` (=12) is larger than the 11 samples"),
        (dict(batch_size=3, devices=[]), "`devices` (=[])"),
    ],
)
def test_get_batches_bad_arguments(kwargs, message):
    X = ids_multi_image(11)
    with pytest.raises(ValueError) as info:
        ml.get_batches(X, rand_key=None, **kwargs)
    assert message in str(info.value)


def test_get_batches_rejects_different_lengths():
    with pytest.raises(ValueError, match="different lengths"):
        ml.get_batches((ids_multi_image(5), ids_multi_image(6)), 2, None)


# ---- steps and training ----------------------------------------------------------------------


def test_train_step_applies_the_optimizer_update(rng):
    X, Y, _, _, model = regression_problem(rng, 6, 1)
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    new_model, _, loss, _ = ml.train_step(MAPPER, model, optimizer, opt_state, X, Y)
    expected_loss, grads = eqx.filter_value_and_grad(lambda m: MAPPER(m, X, Y)[0])(model)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for key in (SCALAR, VECTOR):
        np.testing.assert_allclose(
            new_model.weights[key], model.weights[key] - 0.05 * grads.weights[key], rtol=1e-5
        )


def test_train_lowers_the_loss_without_validation(rng):
    X, Y, _, _, model = regression_problem(rng)
    before = ml.map_loss_in_batches(MAPPER, model, X, Y, 8, None)
    trained, aux, train_loss, val_loss, train_time = ml.train(
        X, Y, MAPPER, model, jax.random.PRNGKey(0), ml.EpochStop(40), 8, optax.adam(0.05)
    )
    after = ml.map_loss_in_batches(MAPPER, trained, X, Y, 8, None)
    assert aux is None and val_loss is None and train_time > 0
    assert float(after) < 0.02 * float(before)
    assert float(train_loss) < 0.1 * float(before)


def test_train_with_validation_stops_on_validation_loss(rng, capsys):
    X, Y, X_val, Y_val, model = regression_problem(rng)
    before = ml.map_loss_in_batches(MAPPER, model, X_val, Y_val, 4, None)
    stop = ml.AnyStop([ml.ValLoss(patience=3, verbose=0), ml.EpochStop(25, verbose=2)])
    trained, _, train_loss, val_loss, _ = ml.train(
        X,
        Y,
        MAPPER,
        model,
        jax.random.PRNGKey(1),
        stop,
        4,
        optax.adam(0.05),
        validation_X=X_val,
        validation_Y=Y_val,
    )
    assert val_loss is not None and float(val_loss) < 0.05 * float(before)
    # the returned model is the best validation model, so it scores the best validation loss
    best = ml.map_loss_in_batches(MAPPER, trained, X_val, Y_val, 4, None)
    np.testing.assert_allclose(best, stop.stop_conditions[0].best_val_loss, rtol=1e-5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[0].startswith("Epoch 1 Train: ")
        and " Val: " in lines[0]
        and "Epoch time: " in lines[0]
    )


def test_train_with_batch_norm_state(rng):
    X = geom.MultiImage(
        {SCALAR: jnp.asarray(2.0 + 3.0 * rng.normal(size=(16, 2, N, N)), jnp.float32)}, D
    )
    Y = geom.MultiImage({SCALAR: 0.5 * X[SCALAR] + 1.0}, D)
    model, state = eqx.nn.make_with_state(NormThenScale)(2)
    before, _ = MAPPER(model, X, Y, state)
    trained, new_state, train_loss, _, _ = ml.train(
        X,
        Y,
        MAPPER,
        model,
        jax.random.PRNGKey(2),
        ml.EpochStop(40),
        8,
        optax.adam(0.1),
        aux_data=state,
    )
    assert float(train_loss) < 0.05 * float(before)
    assert isinstance(new_state, eqx.nn.State)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # the running statistics were threaded through every step: in inference mode the trained
    # model is good with the returned state and bad with the initial (mean 0, variance 1) one
    with_new = ml.map_loss_in_batches(MAPPER, trained, X, Y, 8, None, aux_data=new_state)
    with_initial = ml.map_loss_in_batches(MAPPER, trained, X, Y, 8, None, aux_data=state)
    assert float(with_new) < 0.1 * float(with_initial)


def test_train_dl_accepts_any_reiterable_and_rejects_one_shot_iterators(rng):
    X, Y, _, _, model = regression_problem(rng, 8, 1)
    batches = list(zip(*ml.get_batches((X, Y), 4, None)))
    trained, _, loss, _, _ = ml.train_dl(batches, MAPPER, model, ml.EpochStop(20), optax.adam(0.05))
    assert float(loss) < 0.1 * float(MAPPER(model, X, Y)[0])
    with pytest.raises(ValueError, match="yielded no batches in epoch 2"):
        ml.train_dl(iter(batches), MAPPER, model, ml.EpochStop(3), optax.adam(0.05))


def test_train_argument_errors(rng):
    X, Y, X_val, Y_val, model = regression_problem(rng, 8, 4)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="no validation data"):
        ml.train(X, Y, MAPPER, model, key, ml.ValLoss(), 4, optax.sgd(0.1))
    with pytest.raises(ValueError, match="pass both `validation_X` and `validation_Y`"):
        ml.train(X, Y, MAPPER, model, key, ml.EpochStop(1), 4, optax.sgd(0.1), validation_X=X_val)
    with pytest.raises(ValueError, match="`batch_size` \\(=16\\) is larger than the 8 samples"):
        ml.train(X, Y, MAPPER, model, key, ml.EpochStop(1), 16, optax.sgd(0.1))
    with pytest.raises(TypeError, match="`stop_condition`"):
        ml.train(X, Y, MAPPER, model, key, 5, 4, optax.sgd(0.1))


def test_is_wandb_without_wandb_is_a_clear_error(rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, installed or not
    X, Y, _, _, model = regression_problem(rng, 4, 1)
    with pytest.raises(ImportError, match="`is_wandb=True`.*pip install wandb"):
        ml.train(X, Y, MAPPER, model, None, ml.EpochStop(1), 4, optax.sgd(0.1), is_wandb=True)


# ---- evaluation ------------------------------------------------------------------------------


def test_evaluate_and_map_helpers(rng):
    X, Y, _, _, model = regression_problem(rng, 10, 1)
    direct_map, _ = MAPPER.map(model, X)
    per_sample = ml.Mapper([geom.Losses.SMSE], reduce=None)

    def map_plus_loss(m, x, y, aux_data):
        loss, aux_data = MAPPER(m, x, y, aux_data)
        return loss, aux_data, MAPPER.map(m, x)[0]

    loss, prediction = ml.evaluate(model, map_plus_loss, X, Y, return_map=True)
    np.testing.assert_allclose(loss, MAPPER(model, X, Y)[0], rtol=1e-6)
    np.testing.assert_allclose(prediction[VECTOR], direct_map[VECTOR], rtol=1e-6)

    # batches of 4 cover samples 0..7 in order; samples 8, 9 are dropped
    losses = ml.map_loss_in_batches(per_sample, model, X, Y, 4, jax.random.PRNGKey(0), reduce=None)
    np.testing.assert_allclose(losses, per_sample(model, X, Y)[0][:8], rtol=1e-5)
    mean_loss = ml.map_loss_in_batches(MAPPER, model, X, Y, 4, None)
    np.testing.assert_allclose(mean_loss, np.mean(np.asarray(losses)), rtol=1e-5)

    loss, merged = ml.map_plus_loss_in_batches(map_plus_loss, model, X, Y, 5, None)
    np.testing.assert_allclose(merged[SCALAR], direct_map[SCALAR], rtol=1e-6)
    np.testing.assert_allclose(loss, MAPPER(model, X, Y)[0], rtol=1e-5)

    with pytest.raises(ValueError, match="return \\(loss, aux_data, prediction\\)"):
        ml.evaluate(model, MAPPER, X, Y, return_map=True)


def test_reducers():
    np.testing.assert_allclose(
        ml.loss_reducer([jnp.array(1.0), jnp.array(2.0), jnp.array(6.0)]), 3.0
    )
    merged = ml.multi_image_reducer([ids_multi_image(2), ids_multi_image(3, 10.0)])
    assert sample_ids(merged) == [0, 1, 10, 11, 12]
    with pytest.raises(ValueError, match="`ls` is empty"):
        ml.loss_reducer([])


# ---- save and load ---------------------------------------------------------------------------


def test_save_then_load_restores_an_identical_model(rng, tmp_path):
    model = ChannelMix(random_weights(rng))
    template = ChannelMix(random_weights(rng))
    ml.save(tmp_path / "model.eqx", model)
    loaded = ml.load(tmp_path / "model.eqx", template)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        np.testing.assert_array_equal(a, b)

    ml.save_plus(tmp_path / "plus.eqx", model, {"lr": 0.001, "depth": [1, 2]})
    loaded, extra = ml.load_plus(tmp_path / "plus.eqx", template)
    assert extra == {"lr": 0.001, "depth": [1, 2]}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="written by save; read it with load"):
        ml.load_plus(tmp_path / "model.eqx", template)


def test_train_checkpoints_every_ten_epochs(rng, tmp_path):
    X, Y, _, _, model = regression_problem(rng, 4, 1)
    path = tmp_path / "ckpt.eqx"
    ml.train(X, Y, MAPPER, model, None, ml.EpochStop(9), 4, optax.sgd(0.1), save_model=str(path))
    assert not path.exists()
    trained, *_ = ml.train(
        X, Y, MAPPER, model, None, ml.EpochStop(10), 4, optax.sgd(0.1), save_model=str(path)
    )
    loaded = ml.load(path, model)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(a, b)


# ---- autoregression --------------------------------------------------------------------------


class NextStep(eqx.Module):
    """Predicts the next value of one scalar field as newest + 10 * constant field."""

    def __call__(self, x, aux_data=None):
        block = x[SCALAR]  # channels: step t-1, step t, constant
        out = x.empty()
        out.append(SCALAR[0], SCALAR[1], block[1:2] + 10.0 * block[2:3])
        return out, (aux_data or 0) + 1  # counts the calls through aux_data


def test_autoregressive_map_on_a_hand_checked_case():
    pixels = jnp.arange(N * N, dtype=jnp.float32).reshape(N, N)
    x = geom.MultiImage({SCALAR: jnp.stack([pixels, pixels + 1.0, jnp.full((N, N), 0.5)])}, D)
    out, calls = ml.autoregressive_map(
        NextStep(), x, None, past_steps=2, autoregressive_steps=3, constant_fields={(0, 0): 1}
    )
    assert calls == 3
    # newest is pixels + 1, each step adds 10 * 0.5
    expected = jnp.stack([pixels + 6.0, pixels + 11.0, pixels + 16.0])
    np.testing.assert_allclose(out[SCALAR], expected)

    stepped = ml.autoregressive_step(
        x, geom.MultiImage({SCALAR: (pixels + 7.0)[None]}, D), 2, {(0, 0): 1}
    )
    np.testing.assert_allclose(stepped[SCALAR][0], pixels + 1.0)
    np.testing.assert_allclose(stepped[SCALAR][1], pixels + 7.0)
    np.testing.assert_allclose(stepped[SCALAR][2], 0.5)


def test_autoregressive_step_keeps_key_order_and_handles_two_fields(rng):
    # vector key with 2 fields x 3 past steps, then a scalar key that is all constant
    vec = jnp.asarray(rng.normal(size=(6, N, N, D)), jnp.float32)
    const = jnp.asarray(rng.normal(size=(1, N, N)), jnp.float32)
    x = geom.MultiImage({VECTOR: vec, SCALAR: const}, D)
    new = jnp.asarray(rng.normal(size=(2, N, N, D)), jnp.float32)
    stepped = ml.autoregressive_step(x, geom.MultiImage({VECTOR: new}, D), 3, {SCALAR: 1})
    assert list(stepped.keys()) == [VECTOR, SCALAR]
    for field in range(2):
        np.testing.assert_allclose(
            stepped[VECTOR][3 * field : 3 * field + 2], vec[3 * field + 1 : 3 * field + 3]
        )
        np.testing.assert_allclose(stepped[VECTOR][3 * field + 2], new[field])
    np.testing.assert_allclose(stepped[SCALAR], const)

    with pytest.raises(ValueError, match="`future_steps` \\(=2\\)"):
        ml.autoregressive_step(x, x, 3, {SCALAR: 1}, future_steps=2)
    with pytest.raises(ValueError, match="not a multiple of `past_steps` \\(=4\\)"):
        ml.autoregressive_step(x, x, 4, {SCALAR: 1})


# ---- progress --------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_terminals_and_clears_itself(monkeypatch):
    from ginjax.ml._progress import ProgressBar

    monkeypatch.delenv("GINJAX_PROGRESS", raising=False)
    terminal = FakeTerminal()
    bar = ProgressBar(4, "epoch 1", stream=terminal, delay_s=0.0)
    bar.update()
    assert "epoch 1 [" in terminal.getvalue() and "1/4 batches" in terminal.getvalue()
    bar.close()
    assert terminal.getvalue().endswith("\r")

    pipe = io.StringIO()
    bar = ProgressBar(4, "epoch 1", stream=pipe, delay_s=0.0)
    bar.update()
    bar.close()
    assert pipe.getvalue() == ""

    monkeypatch.setenv("GINJAX_PROGRESS", "0")
    quiet = FakeTerminal()
    bar = ProgressBar(4, "epoch 1", stream=quiet, delay_s=0.0)
    bar.update()
    assert quiet.getvalue() == ""


def test_train_shows_the_progress_bar_on_a_terminal(rng, monkeypatch):
    from ginjax.ml import _progress

    monkeypatch.delenv("GINJAX_PROGRESS", raising=False)
    monkeypatch.setattr(_progress, "_BAR_DELAY_S", 0.0)  # a "long" run from the first batch
    monkeypatch.setattr(_progress, "_BAR_REFRESH_S", 0.0)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    X, Y, _, _, model = regression_problem(rng, 8, 1)
    ml.train(X, Y, MAPPER, model, None, ml.EpochStop(2), 4, optax.sgd(0.1))
    shown = terminal.getvalue()
    assert "epoch 1 [" in shown and "epoch 2 [" in shown and "2/2 batches" in shown


# ---- data parallel ---------------------------------------------------------------------------

_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    import ginjax.geometric as geom
    from ginjax import ml
    from tests.test_ml_training import MAPPER, SCALAR, regression_problem, ids_multi_image

    devices = jax.devices()
    assert len(devices) == 2, devices
    X, Y, X_val, Y_val, model = regression_problem(np.random.default_rng(7), 16, 8)

    # batches are split along the batch axis, half on each device
    (xb,), = ml.get_batches(X, 16, None, devices=devices)
    shards = xb[SCALAR].addressable_shards
    assert sorted(s.device.id for s in shards) == [0, 1], shards
    assert all(s.data.shape == (8, 2, 4, 4) for s in shards)

    def run(devs):
        return ml.train(X, Y, MAPPER, model, jax.random.PRNGKey(0), ml.EpochStop(5), 8,
                        optax.adam(0.05), validation_X=X_val, validation_Y=Y_val, devices=devs)

    one = run(None)
    two = run(devices)
    np.testing.assert_allclose(two[2], one[2], rtol=1e-4)
    np.testing.assert_allclose(two[3], one[3], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(two[0]), jax.tree.leaves(one[0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    initial = ml.map_loss_in_batches(MAPPER, model, X_val, Y_val, 8, None, devices=devices)
    assert float(two[3]) < float(initial)

    try:
        ml.train(X, Y, MAPPER, model, None, ml.EpochStop(1), 5, optax.sgd(0.1), devices=devices)
    except ValueError as error:
        assert "`batch_size` (=5) must be divisible by the number of devices (=2)" in str(error)
    else:
        raise AssertionError("an odd batch over two devices must be refused")
    print("TWO_DEVICES_OK")
    """)


def test_data_parallel_over_two_cpu_devices_matches_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "TWO_DEVICES_OK" in result.stdout, result.stderr[-4000:]


# ---- interface -------------------------------------------------------------------------------

# (parameter names, defaults) of ginjax 0.1.8's public ml functions, as user code calls them
_SIGNATURES = {
    "train": "X Y map_and_loss model rand_key stop_condition batch_size optimizer "
    "validation_X=None validation_Y=None val_map_and_loss=None save_model=None devices=None "
    "aux_data=None is_wandb=False",
    "train_dl": "train_dataloader map_and_loss model stop_condition optimizer val_dataloader=None "
    "val_map_and_loss=None save_model=None aux_data=None is_wandb=False devices=None",
    "train_step": "map_and_loss model optim opt_state x y aux_data=None",
    "evaluate": "model map_and_loss x y aux_data=None return_map=False",
    "get_batches": "multi_images batch_size rand_key devices=None",
    "map_loss_in_batches": "map_and_loss model x y batch_size rand_key devices=None "
    "aux_data=None reduce='mean'",
    "map_plus_loss_in_batches": "map_and_loss model x y batch_size rand_key devices=None "
    "aux_data=None",
    "autoregressive_step": "input output past_steps constant_fields_dict={} future_steps=1",
    "autoregressive_map": "model x aux_data=None past_steps=1 autoregressive_steps=1 "
    "constant_fields={}",
    "save": "filename model",
    "load": "filename model",
    "save_plus": "filename model further_args={}",
    "load_plus": "filename model",
    "smse_loss": "multi_image_x multi_image_y reduce='mean'",
    "timestep_smse_loss": "multi_image_x multi_image_y n_steps reduce='mean'",
    "normalized_smse_loss": "multi_image_x multi_image_y reduce='mean' eps=1e-05",
    "nrmse_loss": "multi_image_x multi_image_y reduce='mean' eps=0",
    "l2_per_pixel_rel_error": "multi_image_x multi_image_y reduce='mean' eps=0",
}


@pytest.mark.parametrize("name", sorted(_SIGNATURES))
def test_signatures_match_ginjax_0_1_8(name):
    import inspect

    params = inspect.signature(getattr(ml, name)).parameters.values()
    rendered = " ".join(
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in params
    )
    assert rendered == _SIGNATURES[name]


def test_importing_ml_and_data_pulls_neither_torch_nor_wandb():
    code = (
        "import sys, ginjax.ml, ginjax.data; "
        "print(sorted(m for m in ('torch', 'wandb') if m in sys.modules))"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
