"""The agreement table of ``melayer weights`` against the scan, on planted tiny checkpoints and real ones.

Usage (from the repository root, with the project's Python)::

    python tools/weights_agreement.py build DIR [--real NAME_OR_PATH ...]   # checkpoints + what the scan says
    python tools/weights_agreement.py predict DIR                           # the weights' prediction, as a table

``build`` writes the planted checkpoints of every tiny family (a plain plant; a writer and a later remover of
the same dim; for families without a post-FFN norm a precursor that the next layer cancels), of two parallel-block
families and of two mixtures of experts (see ``PARALLEL`` and ``MOE``) as safetensors directories under DIR, and ``DIR/truth.json``: the scan's ME layer, massive dims and top neuron at the ME layer
(the neuron with the largest contribution to the massive dim, as ``melayer explain`` ranks them) for each
planted checkpoint and each ``--real`` model. ``predict`` runs ``melayer.analysis.weights.candidates`` from
whichever melayer is first on ``PYTHONPATH`` -- so the same DIR compares two versions of the rule -- and prints
predicted vs scanned (ME layer, dim, neuron).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# parallel-residual families (the FFN reads the layer input) and mixtures of experts with the plants that reach them
# (a remover plants into a dense FFN: Qwen2-MoE's shared expert; Mixtral has none): "fused" is the plain plant saved
# with the experts as transformers holds them (3-D tensors), the others as save_pretrained writes them (per expert)
PARALLEL = ("gpt_neox", "gptj")
MOE = {"mixtral": ("plain", "fused"), "qwen2_moe": ("plain", "remover", "fused")}
PROMPTS_NOTE = "scan on the shipped prompt set (real models) or melayer.testing.PROMPTS (planted)"


def scanned(lm, prompts) -> dict:
    import torch

    import melayer
    from melayer.analysis.attribution import neuron_contributions, record_layers
    from melayer.analysis.me_layer import massive_dims_at, massive_positions

    s = melayer.scan(lm, prompts, progress=False)
    if s.me_layer is None:
        return {"me_layer": None, "dims": [], "neuron": None}
    dims, _ = massive_dims_at(s, s.me_layer)
    pos = massive_positions(s, s.me_layer, dims)
    rec = record_layers(lm, [p.text for p in s.prompts], pos, [s.me_layer])
    contrib = neuron_contributions(lm, s.me_layer, rec[s.me_layer]["down_in"], dims)
    total = contrib.sum(1)
    neurons = [int((contrib[i] * torch.sign(total[i])).argmax()) for i in range(len(dims))]
    return {"me_layer": int(s.me_layer), "dims": dims, "neuron": neurons[0] if neurons else None}


def build(out: Path, real: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    import melayer
    from melayer.testing import MODEL_TYPES, PROMPTS, tiny_lm

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    every = {"plain": dict(me_layer=1, neuron=5, dim=7),
             "remover": dict(me_layer=1, neuron=9, dim=20, num_layers=5, remover=(3, 0.9)),
             "precursor": dict(me_layer=2, num_layers=5, precursor=(0, 20))}
    for family in (*MODEL_TYPES, *PARALLEL, *MOE):
        kinds = list(every)
        if family in ("gemma2", "gemma3_text", "olmo2"):  # the precursor plant needs no post-FFN norm
            kinds.remove("precursor")
        if family in MOE:  # the plants that reach an MoE layer's routed expert or its shared expert
            kinds = MOE[family]
        for kind in kinds:
            name = f"{family}-{kind}"
            lm = tiny_lm(family, **every["plain" if kind == "fused" else kind])
            lm.model.save_pretrained(out / name)
            lm.tokenizer.save_pretrained(out / name)
            if kind == "fused":  # the experts as transformers holds them: one 3-D tensor per projection
                for f in (out / name).glob("*.safetensors"):
                    f.unlink()
                save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()},
                          str(out / name / "model.safetensors"), metadata={"format": "pt"})
            truth[name] = {"path": str(out / name), "planted": [lm.plant.me_layer, lm.plant.dim, lm.plant.neuron],
                           **scanned(lm, list(PROMPTS))}
            print(name, truth[name], flush=True)
    for spec in real:
        lm = melayer.load(spec, progress=False)
        truth[spec] = {"path": spec, "planted": None, **scanned(lm, None)}
        print(spec, truth[spec], flush=True)
        del lm
    (out / "truth.json").write_text(json.dumps(truth, indent=1))


def predict(out: Path) -> None:
    import torch

    from melayer.analysis.weights import candidates
    from melayer.util.errors import MelayerError

    torch.set_num_threads(1)
    truth = json.loads((out / "truth.json").read_text())
    print("| checkpoint | predicted: ME layer, dim, neuron | scanned: ME layer, dims, top neuron | agrees | attention |")
    print("|---|---|---|---|---|")
    hits = 0
    for name, t in truth.items():
        try:
            r = candidates(t["path"], progress=False)
        except MelayerError as exc:  # a family this version does not read: refused in one line
            print(f"| {name} | refused: {str(exc).split(': ', 1)[-1][:90]} | {t['me_layer']}, "
                  f"{','.join(map(str, t['dims']))}, {t['neuron']} | no | |", flush=True)
            continue
        pred = (r.me_layer, r.massive_dim, r.top_neuron)
        ok = pred[0] == t["me_layer"] and pred[1] in t["dims"] and pred[2] == t["neuron"]
        parts = [p for p, good in (("layer", pred[0] == t["me_layer"]), ("dim", pred[1] in t["dims"]),
                                   ("neuron", pred[2] == t["neuron"])) if good]
        hits += ok
        dims = ",".join(map(str, t["dims"]))
        print(f"| {name} | {pred[0]}, {pred[1]}, {pred[2]} | {t['me_layer']}, {dims}, {t['neuron']} | "
              f"{'yes' if ok else ('no' if not parts else ' + '.join(parts) + ' only')} | "
              f"{'o(v(x))' if r.attention == 'o(v(x))' else 'left out'} |", flush=True)
    print(f"\n{hits}/{len(truth)} agree on (ME layer, dim, neuron)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "predict"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--real", nargs="*", default=[], help="embedded names or checkpoint paths to scan too")
    args = ap.parse_args()
    if args.step == "build":
        build(args.dir, args.real)
    else:
        predict(args.dir)


if __name__ == "__main__":
    sys.exit(main())
