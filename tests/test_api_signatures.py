"""The public interface of ginjax 0.1.8, name by name: every module-level name, class, method and
constant its published package has (tests/data/ginjax-0.1.8/signatures.json, read off it with
`inspect`) exists here with the same parameters in the same order, of the same kinds, with the
same defaults, so that code written against 0.1.8 binds its arguments the same way. Parameters
of our own (`backend=`, `residual=`) may follow, keyword-only and defaulted. What the interface
leaves for later (plots, Climate1D) is listed in LATER with the reason."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pathlib

import pytest

SIGNATURES = pathlib.Path(__file__).parent / "data" / "ginjax-0.1.8" / "signatures.json"
ENTRIES = json.loads(SIGNATURES.read_text())["entries"]

# (module, owner or None, name) -> why it is not compared
LATER = {
    ("ginjax.geometric.geometric_image", "GeometricImage", "plot"): "plotting is out of the interface's current scope",
    ("ginjax.geometric.geometric_image", "GeometricFilter", "plot"): "plotting is out of the interface's current scope",
    ("ginjax.geometric.multi_image", "MultiImage", "plot"): "plotting is out of the interface's current scope",
    ("ginjax.models", None, "Climate1D"): "Climate1D (and so its methods) may come later (the interface's scope)",
    ("ginjax.geometric.multi_image", None, "Signature"): "a type alias: its signature is a type's, checked as a name only",
}
KINDS = {"positional": inspect.Parameter.POSITIONAL_OR_KEYWORD, "var_positional": inspect.Parameter.VAR_POSITIONAL,
         "keyword_only": inspect.Parameter.KEYWORD_ONLY, "var_keyword": inspect.Parameter.VAR_KEYWORD}


def _id(entry) -> str:
    return ".".join(filter(None, (entry["module"], entry.get("owner"), entry["name"])))


def _lookup(entry):
    owner = importlib.import_module(entry["module"])
    if entry.get("owner"):
        owner = getattr(owner, entry["owner"])
        return inspect.getattr_static(owner, entry["name"])
    return getattr(owner, entry["name"])


def _default_matches(want: dict, got) -> bool:
    if "function" in want:
        return getattr(got, "__name__", None) == want["function"]
    if "custom_jvp" in want:  # jax.nn.relu and its kin: a custom_jvp object, printed without a name
        return type(got).__name__ == "custom_jvp"
    if "enum" in want:
        return type(got).__name__ == want["enum"] and got.name == want["member"]
    value = ast.literal_eval(want["literal"])
    return type(got) is type(value) and got == value


def _later(entry) -> bool:
    return (entry["module"], entry.get("owner"), entry["name"]) in LATER or (entry["module"], None, entry.get("owner")) in LATER


CHECKED = [e for e in ENTRIES if not _later(e)]


def test_the_later_names_are_in_the_interface():
    """LATER names only what the interface has (a stale entry would hide nothing, but says so)."""
    names = {(e["module"], e.get("owner"), e["name"]) for e in ENTRIES}
    assert set(LATER) <= names
    assert len(CHECKED) > 200 and all(not _later(e) for e in CHECKED)


@pytest.mark.parametrize("entry", CHECKED, ids=_id)
def test_name_and_signature(entry):
    obj = _lookup(entry)
    if entry["kind"] == "constant":
        assert obj == ast.literal_eval(entry["value"])
        return
    if entry["kind"] in ("class", "alias"):
        return  # the lookup above is the check; a class's methods are entries of their own
    if entry["kind"] in ("classmethod", "staticmethod"):
        assert type(obj).__name__ == entry["kind"], f"{_id(entry)} is a {type(obj).__name__}"
        obj = obj.__func__
    params = list(inspect.signature(obj).parameters.values())
    if entry["kind"] in ("method", "classmethod") and params and params[0].name in ("self", "cls"):
        params = params[1:]
    want = entry["params"]
    assert [p.name for p in params[: len(want)]] == [w[0] for w in want], _id(entry)
    for p, (name, kind, default) in zip(params, want):
        ours = p.kind if p.kind is not inspect.Parameter.POSITIONAL_ONLY else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert ours == KINDS[kind], f"{_id(entry)}: `{name}` is {p.kind.description}, 0.1.8's is {kind}"
        if default is None:
            assert p.default is inspect.Parameter.empty, f"{_id(entry)}: `{name}` has a default ({p.default!r}); 0.1.8's has none"
        else:
            assert p.default is not inspect.Parameter.empty and _default_matches(default, p.default), (
                f"{_id(entry)}: `{name}` defaults to {p.default!r}; 0.1.8's to {default}")
    for extra in params[len(want):]:  # ours: after 0.1.8's, keyword-only and defaulted (or **kwargs already there)
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty, (
            f"{_id(entry)}: `{extra.name}` is not in 0.1.8's signature, so it must be keyword-only with a default")
