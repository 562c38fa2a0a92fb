"""The interventions melayer ships, by name: what ``melayer ls methods`` lists and where each one is called."""

from __future__ import annotations

from melayer.interventions.wemask import SELECT_RULES, TOKEN_RULES

METHODS: dict[str, dict[str, str]] = {
    "wemask": {
        "options": f"rate, layers, select ({'/'.join(SELECT_RULES)}), token ({'/'.join(TOKEN_RULES)}), gamma",
        "call": "melayer.wemask(lm, rate, ...); --wemask RATE",
        "what": "zero (or scale by 1 - gamma) int(rate x hidden) dims of the massive token's attention input in "
                "the layers after the ME layer",
    },
    "neuron_ablation": {
        "options": "layer, neurons",
        "call": "ablate.ablated(lm, [NeuronAblation(...)])",
        "what": "zero chosen FFN neurons of one layer (the input of its down projection), reversibly (melayer explain)",
    },
    "norm_edit": {
        "options": "layer, norm role, dims",
        "call": "ablate.ablated(lm, [median_gain_edit(...)])",
        "what": "set chosen gains of one norm to the layer's median gain, reversibly (melayer explain)",
    },
}
