"""How many causal-LM model types of the installed transformers melayer covers.

For every model type in transformers' causal-LM auto mapping: build it from its default config shrunk to tiny
sizes (``melayer.models.shrink.tiny_config``), then ask melayer for its architecture map. ``accepted``: melayer maps
the model's roles; ``validated``: a massive activation planted through those roles shows up where it was planted.

    PYTHONPATH=. python tools/arch_coverage.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import torch

    from melayer.models.coverage import coverage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("types", nargs="*", help="model types (default: all of the causal-LM auto mapping)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = coverage(args.types or None)
    for r in rows:
        print(f"{r['model_type']:28} {r['status']:10} {r.get('block', '') or '':22} {r.get('reason', '')}")
    count = Counter(r["status"] for r in rows)
    built = sum(v for k, v in count.items() if k != "not built")
    print(f"\n{len(rows)} model types; built {built}; " + "; ".join(f"{k} {v}" for k, v in sorted(count.items())))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
