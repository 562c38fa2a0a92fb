"""Which model families ``melayer weights`` reads, tried on every one it can be.

Usage (from the repository root, with the project's Python)::

    python tools/weights_families.py [--out FILE.md]

For every causal-LM model type of the installed transformers that ``melayer.testing.tiny_lm`` builds a tiny model
of (a massive activation planted at layer 2 of 4, dim 20, neuron 9): the model is saved as a checkpoint
(``save_pretrained``) and ranked from its weights alone. A family is **read** when the ranking succeeds; its row
gives the largest relative difference between the path and the model's own first-token hidden states (per layer,
its median and largest |x|, the last layer left out) and whether the prediction is the plant. Otherwise it is
**refused**, with melayer's one-line reason. Families with no tiny model are counted. Prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path


def try_family(model_type: str, directory: Path) -> dict:
    import torch

    from melayer.analysis.weights import candidates
    from melayer.testing import tiny_lm
    from melayer.util.errors import MelayerError

    try:
        lm = tiny_lm(model_type, me_layer=2, neuron=9, dim=20, num_layers=4)
    except Exception as exc:  # transformers cannot build a tiny model of it
        return {"type": model_type, "status": "no tiny model", "why": type(exc).__name__}
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    try:
        r = candidates(str(directory), progress=False)
    except MelayerError as exc:
        return {"type": model_type, "status": "refused", "why": str(exc).split(": ", 1)[-1]}
    with torch.no_grad():
        states = lm.model(input_ids=torch.tensor([[lm.tokenizer.bos_token_id]]), output_hidden_states=True,
                          use_cache=False).hidden_states
    err = 0.0
    for i in range(lm.num_layers - 1):
        a = states[i + 1][0, 0].abs()
        err = max(err, abs(r.layers[i].median / float(a.median()) - 1), abs(r.layers[i].top_value / float(a.max()) - 1))
    plant = lm.plant
    named = (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, plant.flat_neuron)
    return {"type": model_type, "status": "read", "path_error": err, "plant_named": named,
            "moe": lm.experts(2) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    rows = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        with tempfile.TemporaryDirectory(prefix="melayer-family-") as directory:
            rows.append(try_family(model_type, Path(directory)))
    read = [r for r in rows if r["status"] == "read"]
    refused = [r for r in rows if r["status"] == "refused"]
    lines = [f"transformers {transformers.__version__}: {len(rows)} causal-LM model types, "
             f"{len(read) + len(refused)} with a tiny model; **{len(read)} read**, {len(refused)} refused.", "",
             f"Read ({sum(r['moe'] for r in read)} of them mixtures of experts): largest relative difference of the "
             f"path from the model's own stream {max((r['path_error'] for r in read), default=0):.1g}; plant named "
             f"in {sum(r['plant_named'] for r in read)} of {len(read)}: " + ", ".join(f"`{r['type']}`" for r in read),
             "", "| refused | why |", "|---|---|"]
    lines += [f"| `{r['type']}` | {r['why'].replace('|', '/')} |" for r in refused]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
