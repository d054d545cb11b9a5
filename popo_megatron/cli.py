"""`popo` command line: `popo parity` (more subcommands arrive with the trainer and converters)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# fp32 forward of the same weights in a different order of operations.
PARITY_TOLERANCE = 1e-4


def _parity(ns: argparse.Namespace) -> int:
    from popo_megatron.model.hf_config import read_hf_config
    from popo_megatron.model.tiny import TINY_QWEN2, save_random_hf_model
    from popo_megatron.parity import LAYOUTS, run_parity

    unknown = [name for name in ns.layouts if name not in LAYOUTS]
    if unknown:
        print(f"popo parity: unknown layout(s) {unknown}; choose from {list(LAYOUTS)}", file=sys.stderr)
        return 2
    hf_path = ns.hf
    if hf_path is None:
        hf_path = Path(ns.out) / "tiny-qwen2"
        if not (hf_path / "config.json").is_file():
            save_random_hf_model(hf_path, "Qwen2Config", **TINY_QWEN2)
        print(f"popo parity: using a tiny random Qwen2 checkpoint at {hf_path}")
    args = read_hf_config(hf_path)
    print(
        f"popo parity: {args.architecture}, {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} heads / {args.num_kv_heads} KV heads, vocab {args.vocab_size}, "
        f"tied embeddings: {args.tie_word_embeddings}"
    )
    results = run_parity(hf_path, ns.layouts)
    print()
    print(f"{'layout':10s} {'ranks':>5s} {'max |diff|':>11s} {'load (s)':>9s} {'wall (s)':>9s}  result")
    ok = True
    for r in results:
        passed = r["max_abs_diff"] < PARITY_TOLERANCE
        ok &= passed
        print(
            f"{r['layout']:10s} {r['world']:5d} {r['max_abs_diff']:11.2e} {r['load_s']:9.2f} "
            f"{r['wall_s']:9.1f}  {'OK' if passed else 'MISMATCH'}"
        )
    print(f"\nlogits {'match' if ok else 'do NOT match'} transformers within {PARITY_TOLERANCE:g} at every layout")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    parity = sub.add_parser("parity", help="check Megatron-Core logits against transformers at several layouts")
    parity.add_argument("--hf", type=Path, help="HF checkpoint directory (default: a generated tiny Qwen2)")
    parity.add_argument(
        "--layouts",
        type=lambda s: s.split(","),
        default=["tp1", "tp2", "tp2_sp", "pp2"],
        help="comma-separated, from: tp1, tp2, tp2_sp, pp2, tp2_pp2 (default: tp1,tp2,tp2_sp,pp2)",
    )
    parity.add_argument("--out", default="outputs/parity", help="where the generated tiny model is kept")
    parity.set_defaults(func=_parity)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
