"""Measured backend speeds, committed per device kind, that `auto` ranks backends by (GPU kinds,
and `cpu` for the native backend against dense).

`kernels/measured/<device-slug>.json` holds two tables:
- `exact`: per configuration signature (`signature`: geometry, keys and channels, filter bases,
  spatial size, dtype), the median ms of every backend, `fwd` and `fwd_bwd`, at each batch it was
  measured at (`python -m bench measure-auto` measures the configurations the standard model
  steps really run; on the CPU, a grid of small layers: `--configs cpu-small`), with each
  case's compile seconds beside them where measured one at a time (`compile_s`, not ranked by);
- `configs`: per standard bench layer configuration, the same medians at its batch (from a
  committed bench run, `python -m bench measured`); tables written before `exact` existed hold
  only this one.

Ranking (the `fwd_bwd` medians: training is what users run), so that `auto` is never slower than
`dense` where it knows the numbers:
1. exact match: at the batch the call runs at (the product of the vmap axes it is traced under,
   `kernels._registry.traced_batch`), when a fused backend was measured at that batch: the
   backends that beat `dense` there. Otherwise (batch unknown or not measured with a fused
   backend): a backend counts when it was measured at every usable batch of the entry, a fused
   one only where it beat `dense` at every one of them; its number is the geometric mean over
   them. At a known batch, a sample from a larger batch counts a fused backend's time times
   LARGER_BATCH_MARGIN: one layer can win on a fused kernel at batch 4 and lose at batch 1, where
   the launch is too small to fill the GPU (on the H200 a 16+16-channel vector layer at N=64:
   5.07 vs 7.22 ms at batch 4, 3.39 vs 1.91 at batch 1, a swing of 2.5x), so only a win by more
   than that carries down (the dilated layers' 5.5 vs 47.8 ms does; the embedding layer's 3.49 vs
   3.68 does not).
2. otherwise (also at a known batch that no fused backend was measured at) the conservative
   rule: the measured configurations of the same D, the same tensor orders in and out, the same
   stride/dilation class, Cin and Cout within a factor of CHANNEL_FACTOR and grid cells within
   PIXEL_FACTOR, at any batch (larger ones with the margin above); a fused backend only where it
   beat `dense` on every one of them (samples of `dense` alone do not count).
3. no such configuration: `dense` alone, at the time of the nearest measured configuration.
On a CPU (CALLS_PER_COMPILE), each measured time counts its compile: a batch's number for a backend
is its run ms plus its `compile_s` spread over CALLS_PER_COMPILE calls (ms + 1000 * compile_s /
calls), wherever the table recorded compile times for every backend of that batch (samples without
them count run time alone). Small CPU layers run for 0.1-1 ms but compile for 0.1-7 s, so over
the calls a test, a notebook cell or a short run makes, compile is most of what a layer costs;
where native is slower per call on the CPU grid, it still wins back its compile saving only after
4,000-70,000 calls. The GPU tables rank run time alone (no entry: long runs amortise compile).
Backends left out of the returned dict rank after the measured ones (kernels/_registry.py), so
`dense` wins wherever a fused backend was not shown faster.

A GPU without a table of its own ranks by the committed table of a GPU with the same compute
capability (`device_table`: a GH200 by the H200's, sm 9.0). The kernels are the same machine code,
and what makes a layer fused or dense is mostly the same there (tile sizes, channel counts, the
grid's fill), while HBM bandwidth differs (3.35 against 4.8 TB/s). A close call may go the other
way, but the other choice is far worse: with no table, the backends' priorities decide. On an H100
the UNet d3_n64_b4 step then ran its 16^3 layers (64 + 64 channels) on the CUDA kernels, 13.5 ms
of a 44.9 ms step (bench/NOTES.md, session 32), where the H200's table keeps them on dense.
No table of the device or of its capability: {} and the priorities decide. A device's own table
goes over the stand-in row by row and batch by batch (`device_table`): its `configs` rows replace
the stand-in's of the same name, and its `exact` rows the stand-in's batch sizes it measured, the
stand-in's other rows and batch sizes staying, so a device can measure the configurations where
the stand-in is missing or wrong (the H100's 2D rows) without re-measuring the rest. (Whole exact
rows replaced, the H100's batch-4 rows of the 3D UNet hid the H200's batch-1 ones, and batch-1
UNet layers fell to `dense` by the larger-batch margin.) Every other table of the capability fills in below those two: the stand-in
itself (the H200) ranks the configurations only a sibling measured (the H100's 2D rows: its
dilated layers at 2.4 ms on triton against 22 on cuDNN) by the sibling's rows, rather than by
"nothing similar measured". The similar-configuration rule (2) then draws on all their rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import pathlib
import re
from typing import Optional

from ._spec import ConvSpec

_DIR = pathlib.Path(__file__).parent / "measured"
BASELINE = "dense"
CHANNEL_FACTOR = 2.0
PIXEL_FACTOR = 8.0  # one halving of a 3D grid: a UNet's next level
MODES = ("fwd", "fwd_bwd")
# how much faster than dense a fused backend must have been at a larger batch to count at a
# smaller one (module doc, rule 1)
LARGER_BATCH_MARGIN = 2.5
# calls one compile is spread over, per device slug (absent: run time alone)
CALLS_PER_COMPILE = {"cpu": 1000}
COMPILE_RULE = "ms per call = run ms + compile / "  # how a rule that counted compile says so
ORIGIN = "measured_on"  # on a stand-in's row in a merged table (`device_table`): the device it came from


def device_slug(device_kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


def signature(spec: ConvSpec, spatial, dtype=None) -> str:
    """The exact key of a configuration: readable geometry, then a hash of the filter bases."""
    digest = hashlib.sha1()
    for pair in spec.pairs:
        digest.update(f"{pair.in_index},{pair.out_index},{pair.basis.array.shape};".encode())
        digest.update(pair.basis.array.tobytes())

    def keys(ks):
        return ",".join(f"{k}.{p}x{c}" for k, p, c in ks)

    def axes(values):
        return ",".join(str(v) for v in values)

    torus = "".join("t" if t else "z" for t in spec.is_torus)
    pads = ";".join(f"{a}/{b}" for a, b in (tuple(map(sum, zip(t, z))) for t, z in zip(spec.torus_pad, spec.zero_pad)))
    return (
        f"D{spec.D} in[{keys(spec.in_keys)}] out[{keys(spec.out_keys)}] M{axes(spec.filter_shape)} "
        f"s{axes(spec.stride)} ld{axes(spec.lhs_dilation)} rd{axes(spec.rhs_dilation)} {torus} pad{pads} "
        f"N{axes(spatial)} {dtype or 'float32'} basis:{digest.hexdigest()[:10]}"
    )


def describe(spec: ConvSpec, spatial) -> dict:
    """The fields the conservative rule compares (stored beside every exact entry)."""
    return {
        "D": spec.D,
        "in_orders": sorted({k for k, _, _ in spec.in_keys}),
        "out_orders": sorted({k for k, _, _ in spec.out_keys}),
        "cin": spec.cin,
        "cout": spec.cout,
        "k_max": max(k for k, _, _ in spec.in_keys + spec.out_keys),
        "geometry": geometry_class(spec),
        "pixels": math.prod(spatial) if spatial else None,
    }


def geometry_class(spec: ConvSpec) -> str:
    if any(s != 1 for s in spec.stride):
        return "strided"
    if any(d != 1 for d in spec.lhs_dilation):
        return "transposed"
    if any(d != 1 for d in spec.rhs_dilation):
        return "dilated"
    return "plain"


@functools.lru_cache(maxsize=None)
def load(device_kind: str) -> Optional[dict]:
    """The whole table file for a device kind (None when there is none)."""
    path = _DIR / f"{device_slug(device_kind)}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def kinds_of_capability() -> dict[str, tuple[str, ...]]:
    """Compute capability -> the device kinds of the committed tables recorded with it, the one
    with the most `exact` rows first (then by file name): the stand-in of its capability, so a
    table that measured a few rows (an H100's 2D layers) does not become it."""
    found: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("compute_capability") and data.get("device_kind"):
            found.setdefault(str(data["compute_capability"]), []).append((-len(data.get("exact") or {}), data["device_kind"]))
    # sorted() is stable: equal row counts keep the file-name order
    return {cap: tuple(kind for _, kind in sorted(kinds, key=lambda rk: rk[0])) for cap, kinds in found.items()}


def kinds_by_capability() -> dict[str, str]:
    """Compute capability -> the device kind whose table stands in for it (`kinds_of_capability`)."""
    return {cap: kinds[0] for cap, kinds in kinds_of_capability().items()}


def device_table(device_kind: str, capability: str = "") -> tuple[str, Optional[dict], str]:
    """(the device kind to name, the table `auto` ranks by on `device_kind`, a note where it is
    not the device's own alone): the device's own rows first, then those of the other tables of
    its compute capability, the stand-in's before the rest (module doc); None where there are none.
    Rows from a table other than the named one carry ORIGIN, which `ranking`'s rules report."""
    own = load(device_kind)
    others = [k for k in (kinds_of_capability().get(capability, ()) if capability else ()) if k != device_kind]
    tables = ([(device_kind, own)] if own is not None else []) + [(k, load(k)) for k in others]
    tables = [(k, t) for k, t in tables if t is not None]
    if not tables:
        return device_kind, None, ""
    named, first = tables[0]
    lead = "" if named == device_kind else f"{device_kind} has no measured table; ranked by the {named}'s"
    if len(tables) == 1:
        return named, first, (lead + f", of the same compute capability {capability}" if lead else "")
    merged = dict(first)
    for part in ("exact", "configs"):
        rows: dict = {}
        for kind, table in reversed(tables):  # the named table's rows last, so they win
            for key, row in (table.get(part) or {}).items():
                row = row if kind == named else {**row, ORIGIN: kind}
                below = rows.get(key)
                if part == "exact" and below is not None:
                    # batch by batch: the batch sizes below that this row lacks stay, marked with their origin
                    kept = {b: s if ORIGIN in s else {**s, ORIGIN: below[ORIGIN]} for b, s in below["batches"].items()}
                    row = {**row, "batches": {**kept, **row["batches"]}}
                rows[key] = row
        merged[part] = rows
    fill = ", then ".join(f"the {k}'s" for k, _ in tables[1:])
    head = lead or f"{device_kind}'s own rows"
    return named, merged, f"{head}, and where it has none {fill}, of the same compute capability {capability}"


def table_for(device_kind: str) -> Optional[dict]:
    """The per-bench-configuration table (`configs`), as tables have always had it."""
    data = load(device_kind)
    return data.get("configs") if data else None


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values))


def _compiled(batch: dict, mode: str) -> Optional[dict]:
    """A measured batch's compile seconds per backend, when recorded for every backend it timed."""
    compiled = (batch.get("compile_s") or {}).get(mode) or {}
    return compiled if batch.get(mode) and set(batch[mode]) <= set(compiled) else None


def _costs(batch: dict, mode: str, calls: Optional[int]) -> Optional[dict]:
    """One measured batch's {backend: ms to rank by}: the median run ms, plus each backend's
    compile spread over `calls` calls where compile times were recorded for all of them."""
    compiled = _compiled(batch, mode) if calls else None
    if compiled is None:
        return batch.get(mode)
    return {name: t + 1000.0 * compiled[name] / calls for name, t in batch[mode].items()}


def _allowed(batches: list[dict], mode: str, calls: Optional[int] = None) -> dict[str, float]:
    """Backend -> geometric-mean ms to rank by over the measured `batches` (see _costs), keeping a
    backend only if it was measured in every one and, unless it is the baseline, beat the baseline
    in each."""
    samples = [_costs(b, mode, calls) for b in batches]
    if not samples or any(not s or BASELINE not in s for s in samples):
        return {}
    names = set.intersection(*(set(s) for s in samples))
    out = {}
    for name in names:
        if name != BASELINE and not all(s[name] < s[BASELINE] for s in samples):
            continue
        out[name] = round(_geomean(s[name] for s in samples), 4)
    return out


def _compile_note(batches: list[dict], mode: str, calls: Optional[int], names) -> str:
    """What the ranked numbers are made of when compile counted: each backend's run ms and
    compile s (geometric means over `batches`), for `explain`."""
    if not calls:
        return ""
    timed = [b for b in batches if _compiled(b, mode) is not None]
    if not timed:
        return ""
    parts = []
    for name in sorted(names):
        run = _geomean(b[mode][name] for b in timed)
        compiled = _geomean(b["compile_s"][mode][name] for b in timed)
        parts.append(f"{name} {run:.4g} ms + {compiled:.3g} s compile")
    share = "" if len(timed) == len(batches) else f" ({len(timed)} of {len(batches)} samples timed compile)"
    return f"; {COMPILE_RULE}{calls} calls{share}: " + ", ".join(parts)


def _has_fused(sample: dict) -> bool:
    """Whether a {backend: ms} sample holds anything but the baseline."""
    return bool(set(sample) - {BASELINE})


def _old_entries(data: dict) -> list[dict]:
    """The `configs` table's entries in the shape of exact entries (one batch each)."""
    out = []
    for entry in (data.get("configs") or {}).values():
        out.append({
            "D": entry["D"], "cin": entry["cin"], "cout": entry["cout"], "k_max": entry["k_max"],
            "pixels": entry.get("pixels"), "geometry": "plain",
            "batches": {"bench": {m: entry.get(m, {}) for m in MODES}},
            **({ORIGIN: entry[ORIGIN]} if ORIGIN in entry else {}),
        })
    return out


def _similar(entry: dict, want: dict, exact: bool = False) -> bool:
    """Same D, orders and geometry class; channels within CHANNEL_FACTOR (exact: the same channels
    and pixels)."""
    if entry["D"] != want["D"] or entry.get("geometry", "plain") != want["geometry"]:
        return False
    if exact:
        return (entry["k_max"], entry["cin"], entry["cout"], entry.get("pixels")) == (
            want["k_max"], want["cin"], want["cout"], want["pixels"])
    if "in_orders" in entry:
        if entry["in_orders"] != want["in_orders"] or entry["out_orders"] != want["out_orders"]:
            return False
    elif entry["k_max"] != want["k_max"]:
        return False
    if want.get("pixels") and entry.get("pixels") and not 1 / PIXEL_FACTOR <= entry["pixels"] / want["pixels"] <= PIXEL_FACTOR:
        return False
    return all(
        1 / CHANNEL_FACTOR <= entry[c] / want[c] <= CHANNEL_FACTOR for c in ("cin", "cout")
    )


def _source(entry: dict, sample: dict) -> dict:
    """{ORIGIN: the device} where a batch sample came from another table than the named one (the
    sample's own mark, from a merged row, else its row's), {} where it is the device's own."""
    origin = sample.get(ORIGIN, entry.get(ORIGIN))
    return {ORIGIN: origin} if origin else {}


def _origin(entries: list[dict]) -> str:
    """Where rows of a merged table came from the stand-in (`device_table`): ", the X's row" for
    one, ", n of them the X's" for several; "" where all are the device's own."""
    counts: dict[str, int] = {}
    for e in entries:
        if ORIGIN in e:
            counts[e[ORIGIN]] = counts.get(e[ORIGIN], 0) + 1
    if not counts:
        return ""
    if len(entries) == 1:
        return f", the {next(iter(counts))}'s row"
    return ", " + ", ".join(f"{n} of them the {k}'s" for k, n in sorted(counts.items()))


def ranking(device_kind: str, spec: ConvSpec, spatial=None, dtype=None, mode: str = "fwd_bwd",
            table: Optional[dict] = None, batch: Optional[int] = None) -> tuple[dict, str]:
    """(backend -> ms to rank by, which rule decided) for one configuration; see the module doc.
    `table`: a table file's content to use instead of the committed one of `device_kind`;
    `batch`: the batch the call runs at, when known."""
    data = table if table is not None else load(device_kind)
    if not data:
        return {}, "no table for this device"
    calls = CALLS_PER_COMPILE.get(device_slug(device_kind))

    def verdict(batches: list[dict], rule: str) -> tuple[dict, str]:
        ms = _allowed(batches, mode, calls)
        return ms, rule + (_compile_note(batches, mode, calls, ms) if ms else "")

    def sample(key: str, measured: dict) -> dict:
        # a larger batch's sample, its fused times times the margin (module doc, rule 1); the
        # "bench" rows of the old table name no batch and are taken as measured
        if batch is None or not key.isdigit() or int(key) <= batch or not measured.get(mode):
            return measured
        times = {n: v if n == BASELINE else v * LARGER_BATCH_MARGIN for n, v in measured[mode].items()}
        return {**measured, mode: times}

    exact = data.get("exact") or {}
    want = describe(spec, spatial)
    old = _old_entries(data)
    if spatial is not None:
        entry = exact.get(signature(spec, spatial, dtype))
        if entry:
            at_batch = entry["batches"].get(str(batch), {}) if batch is not None else {}
            if BASELINE in at_batch.get(mode, {}) and _has_fused(at_batch[mode]):
                return verdict([at_batch], f"exact match at batch {batch}{_origin([_source(entry, at_batch)])}")
            batches = [sample(k, b) for k, b in entry["batches"].items() if b.get(mode)]
            origin = _origin([_source(entry, b) for b in batches])
            ms, rule = verdict(batches, f"exact match, {len(batches)} batch size(s){origin}")
            # at a known batch that no fused backend was measured at, dense alone is no verdict:
            # the similar configurations (this one's other batches among them) may still show one
            if ms and (batch is None or _has_fused(ms)):
                return ms, rule
        # a standard bench layer of the `configs` table: the same sizes count as an exact match
        same_entries = [e for e in old if _similar(e, want, exact=True) and e["batches"]["bench"].get(mode)]
        same = [e["batches"]["bench"] for e in same_entries]
        ms, rule = verdict(same, "a benchmarked configuration of the same sizes" + _origin(same_entries))
        if ms:
            return ms, rule
    entries = list(exact.values()) + old
    similar = [e for e in entries if _similar(e, want)]
    # a sample of dense alone (a budget cut its fused cases) says nothing about the fused ones
    used = [(e, sample(k, b)) for e in similar for k, b in e["batches"].items() if b.get(mode) and _has_fused(b[mode])]
    batches = [b for _, b in used]
    ms, rule = verdict(batches, f"{len(batches)} similar measured configuration(s)" + _origin([_source(e, b) for e, b in used]))
    if ms:
        return ms, rule
    # nothing close was measured: dense, at the time of the nearest configuration of this D
    candidates = [e for e in entries if e["D"] == spec.D] or entries
    with_dense = [(e, b[mode]) for e in candidates for b in e["batches"].values() if b.get(mode, {}).get(BASELINE)]
    if not with_dense:
        return {}, "no measured configuration"
    size = math.log(max(spec.cin * spec.cout, 1))
    nearest = min(with_dense, key=lambda eb: abs(math.log(eb[0]["cin"] * eb[0]["cout"]) - size))
    return {BASELINE: nearest[1][BASELINE]}, "nothing similar measured: dense"


def measured_ms(device_kind: str, spec: ConvSpec, spatial=None, mode: str = "fwd_bwd", dtype=None,
                batch: Optional[int] = None) -> dict[str, float]:
    """Backend -> ms that `auto` ranks by for `spec` ({} if the device has no table)."""
    return ranking(device_kind, spec, spatial, dtype, mode, batch=batch)[0]
