"""Every result JSON loads back into its result object: to_dict -> JSON file -> load (melayer.read) -> to_dict is
the same JSON, on tiny real checkpoints (random weights with a planted massive activation)."""

from __future__ import annotations

import json

import pytest

import melayer
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError
from melayer.util.io import write_json

PROMPTS = ["The cat sat on the mat, and then it slept all afternoon.", "Hello world, a test of the model here.",
           "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "Another prompt here, with some more words in it!"]


def _json(data: dict) -> dict:
    """What a file holds: NaN written as null, int keys as strings, tuples as lists."""
    return json.loads(json.dumps(data, default=str).replace("NaN", "null"))


def _round_trip(result, tmp_path, name: str):
    path = tmp_path / name
    write_json(path, result.to_dict())
    back = melayer.read(path)
    assert type(back) is type(result)
    assert _json(back.to_dict()) == json.loads(path.read_text())
    assert type(result).load(path).to_dict() == back.to_dict()
    return back


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", me_layer=1, num_layers=5)


def test_scan_round_trips(lm, tmp_path):
    result = melayer.scan(lm, PROMPTS, progress=False)
    back = _round_trip(result, tmp_path, "scan.json")
    assert back.me_layer == result.me_layer == 1 and back.massive_dims == result.massive_dims
    assert back.massive_tokens() == result.massive_tokens() and back.per_layer() == result.per_layer()


def test_sinks_round_trip(lm, tmp_path):
    result = melayer.sinks(lm, PROMPTS, min_tokens=None, progress=False)
    back = _round_trip(result, tmp_path, "sinks.json")
    assert back.sink_rate == result.sink_rate and back.first_sink_layer() == result.first_sink_layer()


def test_rigidity_round_trips(lm, tmp_path):
    back = _round_trip(melayer.rigidity(lm, PROMPTS, progress=False), tmp_path, "rigidity.json")
    assert back.me_layer == 1


def test_explain_round_trips(tmp_path):
    lm6 = tiny_lm("llama", me_layer=1, num_layers=6)
    result = melayer.explain(lm6, PROMPTS, random_draws=2, ppl_tokens=24, progress=False)
    back = _round_trip(result, tmp_path, "explain.json")
    assert back.verdict() == result.verdict()


def test_weights_round_trip_with_its_confirmation(lm, tmp_path):
    from conftest import save_lm

    ckpt = save_lm(lm, tmp_path / "ckpt")
    result = melayer.weights(str(ckpt), lm=lm, prompts=PROMPTS, progress=False)
    assert result.confirm is not None
    back = _round_trip(result, tmp_path, "weights.json")
    assert back.confirm == result.confirm and back.layers == result.layers


def test_eval_and_compare_round_trip(lm, tmp_path):
    out = tmp_path / "eval"
    result = melayer.evaluate(lm, "arc_easy", limit=4, batch_size=4, output=out, progress=False)
    back = melayer.read(out / "eval.json")
    assert back.to_dict() == json.loads((out / "eval.json").read_text())
    assert len(back.records) == 4 and back.metrics == _json(result.metrics)
    cmp = melayer.compare(lm, "arc_easy", [0.0, 0.25], limit=4, batch_size=4, me_layer=1, sinks=False,
                          progress=False)
    _round_trip(cmp, tmp_path, "compare.json")


def test_sweep_state_round_trips(tmp_path):
    from melayer.sweeps.runner import SweepResult

    result = SweepResult(output=str(tmp_path), executor="local", cells=[{"id": "a"}, {"id": "b"}, {"id": "c"}],
                         records={"a": {"id": "a", "status": "done"}, "b": {"id": "b", "status": "failed", "error": "x"}},
                         skipped=["c"], elapsed_s=1.5, spec={"models": ["m"]})
    back = _round_trip(result, tmp_path, "sweep.json")
    assert back.ran == ["a"] and back.failed == {"b": "x"}


def test_reading_the_wrong_kind_or_version_is_one_clear_error(lm, tmp_path):
    path = write_json(tmp_path / "scan.json", melayer.scan(lm, PROMPTS[:2], progress=False).to_dict())
    with pytest.raises(MelayerError, match="holds a 'scan' result, not 'sinks'"):
        melayer.SinkResult.load(path)
    data = json.loads(path.read_text())
    write_json(tmp_path / "v9.json", {**data, "schema": "melayer.scan/9"})
    with pytest.raises(MelayerError, match="version this melayer does not read"):
        melayer.read(tmp_path / "v9.json")
    write_json(tmp_path / "old.json", {k: v for k, v in data.items() if k != "prompts"})
    with pytest.raises(MelayerError, match="without the fields it needs"):
        melayer.read(tmp_path / "old.json")
    with pytest.raises(MelayerError, match="not a melayer output"):
        melayer.read(write_json(tmp_path / "x.json", {"a": 1}))
