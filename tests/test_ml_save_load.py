"""ginjax.ml.save/load/save_plus/load_plus: the checked file format (magic + version, leaf table,
payload length and SHA-256), atomic writes, and a clear error naming the file for every bad file."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ginjax.geometric as geom
from ginjax import ml
from ginjax.layers import ConvContract


class Affine(eqx.Module):
    w: jax.Array
    b: jax.Array
    scale: float = 2.0


def _model(rng, n=3):
    return Affine(jnp.asarray(rng.normal(size=(n, n)), jnp.float32), jnp.asarray(rng.normal(size=(n,)), jnp.float32))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_round_trip_and_format_header(rng, tmp_path):
    model, template = _model(rng), _model(rng)
    path = tmp_path / "m.eqx"
    ml.save(path, model)
    _assert_same(ml.load(path, template), model)
    magic, header, _ = path.read_bytes().split(b"\n", 2)
    assert magic == b"GINJAX-SAVE 1"
    header = json.loads(header)
    assert header["kind"] == "save" and len(header["sha256"]) == 64
    assert [leaf[0] for leaf in header["leaves"]] == [".w", ".b", ".scale"]

    ml.save_plus(tmp_path / "p.eqx", model, {"lr": 1e-3, "sizes": (1, 2)})
    loaded, extra = ml.load_plus(tmp_path / "p.eqx", template)
    _assert_same(loaded, model)
    assert extra == {"lr": 1e-3, "sizes": [1, 2]}


def _corrupt_weight(path):
    """The first weight of the payload multiplied by 1e24 (the file keeps its length)."""
    data = bytearray(path.read_bytes())
    npy = data.index(b"\x93NUMPY")  # the first leaf, an .npy record (format 1: 2-byte header length)
    start = npy + 10 + int.from_bytes(data[npy + 8 : npy + 10], "little")
    value = np.frombuffer(bytes(data[start : start + 4]), np.float32)[0]
    data[start : start + 4] = np.float32(value * np.float32(1e24)).tobytes()
    assert bytes(data) != path.read_bytes()
    path.write_bytes(bytes(data))


BAD_FILES = [
    ("empty", lambda p: p.write_bytes(b""), "is empty"),
    ("random bytes", lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)), "not a ginjax save file"),
    ("truncated payload", lambda p: p.write_bytes(p.read_bytes()[:-5]), "is truncated"),
    ("truncated header", lambda p: p.write_bytes(p.read_bytes()[:40]), "damaged or truncated header"),
    ("junk appended", lambda p: p.write_bytes(p.read_bytes() + b"junk"), "4 unexpected bytes"),
    ("weight off by 1e24", _corrupt_weight, "is corrupted"),
    ("future version", lambda p: p.write_bytes(p.read_bytes().replace(b"SAVE 1", b"SAVE 9", 1)), "version '9'"),
    ("headerless (older format)", lambda p: p.write_bytes(p.read_bytes().split(b"\n", 2)[2]), "not a ginjax save file"),
]


@pytest.mark.parametrize("name,damage,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_damaged_files_raise_an_error_naming_the_file(rng, tmp_path, name, damage, message):
    path = tmp_path / "model.eqx"
    ml.save(path, _model(rng))
    damage(path)
    with pytest.raises(ml.SaveFileError, match=message) as info:
        ml.load(path, _model(rng))
    assert str(path) in str(info.value)


def test_other_architecture_and_wrong_reader_are_named(rng, tmp_path):
    ml.save(tmp_path / "a.eqx", _model(rng, 3))
    with pytest.raises(ml.SaveFileError, match=r"another architecture.*\.w \(3, 3\).*\.w \(4, 4\)"):
        ml.load(tmp_path / "a.eqx", _model(rng, 4))
    with pytest.raises(ml.SaveFileError, match="written by save; read it with load"):
        ml.load_plus(tmp_path / "a.eqx", _model(rng))
    ml.save_plus(tmp_path / "p.eqx", _model(rng), {"a": 1})
    with pytest.raises(ml.SaveFileError, match="written by save_plus; read it with load_plus") as info:
        ml.load(tmp_path / "p.eqx", _model(rng))
    assert "p.eqx" in str(info.value)


def test_write_is_atomic_a_failed_save_keeps_the_old_file(rng, tmp_path, monkeypatch):
    path = tmp_path / "model.eqx"
    old = _model(rng)
    ml.save(path, old)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("ginjax.ml._serialise.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ml.save(path, _model(rng))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.eqx"]  # no temp file left behind


def test_save_plus_rejects_what_json_cannot_store(rng, tmp_path):
    with pytest.raises(ValueError, match="`further_args` cannot be stored as JSON"):
        ml.save_plus(tmp_path / "p.eqx", _model(rng), {"f": object()})
    assert not (tmp_path / "p.eqx").exists()


def test_conv_contract_model_round_trip_keeps_its_filters_as_constants(tmp_path):
    D = 2
    filters = geom.get_invariant_filters([3], [0, 1], [0, 1], D, geom.make_all_operators(D))
    sig = geom.Signature((((0, 0), 2), ((1, 0), 1)))
    layer = ConvContract(sig, sig, filters, key=jax.random.PRNGKey(0))
    other = ConvContract(sig, sig, filters, key=jax.random.PRNGKey(1))
    ml.save(tmp_path / "c.eqx", layer)
    loaded = ml.load(tmp_path / "c.eqx", other)
    _assert_same(loaded, layer)
    assert loaded.invariant_filters == layer.invariant_filters
