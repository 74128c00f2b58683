"""Benchmark: bytes per parameter of the wire codec against the Shannon estimate.

For the full-width BrainAgeCNN (2,948,801 parameters, random Glorot weights) pruned with global
magnitude masks (``global_magnitude_mask``; at 95% random init empties conv5, so the global mask
has much lower entropy than i.i.d. bits) and with layer-wise magnitude masks
(``layerwise_magnitude_mask``: every tensor at the same density, an i.i.d.-like case), at
several sparsities, each message is really encoded (``codec.encode``), decoded and checked, and
its length is compared with:

- the paper's formula (non-zero count x 4 bytes, ``codec.paper_bytes``);
- the i.i.d. Shannon estimate ``values + n * H(density)`` over all parameters
  (``codec.shannon_bound_bits``, value bits 32 for float32 messages and 16 for float16 ones).

``ratio`` is encoded bytes / bound; the target is ``ratio <= 1.10`` for the best float32
bitmask encoding at 0.95 and 0.99 sparsity.

Usage::

    .venv/bin/python benchmarks/bench_codec.py [--sparsities 0 0.5 0.9 0.95 0.99] [--level 3]

Prints a table and writes ``<out>/codec.json``; exits 1 if a round trip fails.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from _common import write_results

from fedsparse_lib.federated.codec import Encoding, ValueDType, decode, encode, paper_bytes, shannon_bound_bits
from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.pruning import (apply_mask, emptied_layers, global_magnitude_mask,
                                   layerwise_magnitude_mask)

#: (label, encode options, value bits of the bound, send the mask)
CONFIGS: list[tuple[str, dict, int, bool]] = [
    ("dense_f32", dict(encoding=Encoding.DENSE), 32, False),
    ("bitmask_f32", dict(encoding=Encoding.BITMASK), 32, True),
    ("bitmask_f32_zmask", dict(encoding=Encoding.BITMASK, compress_mask=True), 32, True),
    ("bitmask_f32_zall", dict(encoding=Encoding.BITMASK, compress_mask=True, compress_payload=True), 32, True),
    ("bitmask_f16_zmask", dict(encoding=Encoding.BITMASK, values=ValueDType.FLOAT16, compress_mask=True), 16, True),
    ("bitmask_f16_zall", dict(encoding=Encoding.BITMASK, values=ValueDType.FLOAT16, compress_mask=True,
                              compress_payload=True), 16, True),
]


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95, 0.99])
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    base = {k: v.clone() for k, v in BrainAgeCNN().state_dict().items()}
    n_total = sum(t.numel() for t in base.values())

    rows, ok = [], True
    for kind, make_mask in (("global", global_magnitude_mask), ("layerwise", layerwise_magnitude_mask)):
        for s in args.sparsities:
            mask = make_mask(base, s)
            state = {k: v.clone() for k, v in base.items()}
            apply_mask(state, mask)
            kept = sum(int(m.sum()) for m in mask.values()) + sum(
                t.numel() for k, t in state.items() if k not in mask)
            for label, opts, vbits, with_mask in CONFIGS:
                m = mask if with_mask else None
                t0 = time.perf_counter()
                data = encode(state, m, level=args.level, **opts)
                t1 = time.perf_counter()
                got, got_mask = decode(data)
                t2 = time.perf_counter()
                if opts.get("values") is ValueDType.FLOAT16:
                    want = {k: v.half().float() for k, v in state.items()}
                else:
                    want = state
                good = _equal(got, want) and (got_mask is None if m is None else _equal(got_mask, mask))
                ok &= good
                # Dense sends every value; its bound is the dense size (no mask to describe).
                bound_bits = n_total * vbits if not with_mask else shannon_bound_bits(n_total, kept, vbits)
                rows.append({
                    "mask": kind, "sparsity": s, "encoding": label, "bytes": len(data),
                    "bytes_per_param": len(data) / n_total, "bound_bytes": bound_bits / 8,
                    "ratio_to_bound": len(data) / (bound_bits / 8), "paper_bytes": paper_bytes(mask, state),
                    "encode_s": t1 - t0, "decode_s": t2 - t1, "round_trip_ok": good,
                    "emptied_layers": emptied_layers(mask),
                })

    hdr = f"{'mask':9} {'sparsity':>8} {'encoding':18} {'bytes':>10} {'B/param':>8} {'bound B':>10} {'ratio':>6} {'paper B':>10} {'enc s':>6} {'dec s':>6}"
    print(f"BrainAgeCNN full width, {n_total:,} parameters, random Glorot weights, zstd level {args.level}")
    print(hdr)
    for r in rows:
        print(f"{r['mask']:9} {r['sparsity']:8.2f} {r['encoding']:18} {r['bytes']:10,} {r['bytes_per_param']:8.4f} "
              f"{r['bound_bytes']:10,.0f} {r['ratio_to_bound']:6.3f} {r['paper_bytes']:10,} "
              f"{r['encode_s']:6.3f} {r['decode_s']:6.3f}" + ("" if r["round_trip_ok"] else "  ROUND TRIP FAILED"))
    for kind in ("global", "layerwise"):
        for s in args.sparsities:
            e = [r["emptied_layers"] for r in rows if r["mask"] == kind and r["sparsity"] == s][0]
            if e:
                print(f"{kind} mask at {s}: emptied layers {e}")

    targets = {}
    for kind in ("global", "layerwise"):
        for s in (0.95, 0.99):
            cand = [r for r in rows if r["mask"] == kind and r["sparsity"] == s and r["encoding"].startswith("bitmask_f32")]
            if cand:
                best = min(cand, key=lambda r: r["bytes"])
                targets[f"{kind}@{s}"] = {"encoding": best["encoding"], "ratio": best["ratio_to_bound"],
                                         "met": best["ratio_to_bound"] <= 1.10}
                print(f"target {kind}@{s}: best float32 {best['encoding']} ratio {best['ratio_to_bound']:.3f} "
                      f"({'met' if best['ratio_to_bound'] <= 1.10 else 'NOT met'}, target <= 1.10)")

    write_results(args.out, "codec.json", {
        "config": {"model": "BrainAgeCNN(width=1)", "parameters": n_total, "weights": "random Glorot",
                   "seed": args.seed, "zstd_level": args.level, "sparsities": args.sparsities,
                   "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows, "targets": targets, "round_trip_ok": ok}, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
