"""``melayer sweep`` / ``melayer aggregate``: real cells on a saved tiny checkpoint, under each executor.

Every cell is a real run (scan, eval, compare) of a tiny planted Llama; nothing is mocked. The local pool,
submitit's local cluster and a Ray instance started on this machine must give the identical table; a sweep
killed mid-way and a cell torn mid-write are finished by re-running, which redoes only what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from melayer.util.errors import MelayerError
from melayer.util.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1",
       "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def grid(model: Path, rates=(0.05, 0.1, 0.2)) -> dict:
    """3 rates x 2 select rules on one task: 6 compare cells + 1 baseline + 1 scan."""
    return {"models": [str(model)], "runs": [{"command": "compare", "tasks": ["lambada"], "rates": list(rates),
                                              "select": ["activation", "weight"], "limit": 4, "batch_size": 4,
                                              "n_boot": 200}]}


def rows(table_dir: Path) -> list[dict]:
    return json.loads((table_dir / "table.json").read_text())["rows"]


def cli(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "melayer", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **ENV}, cwd=REPO, timeout=timeout, check=False)
    return proc


@pytest.fixture(scope="module")
def spec_file(planted_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "grid.yaml"
    path.write_text(yaml.safe_dump(grid(planted_dir)))
    return path


@pytest.fixture(scope="module")
def local_run(spec_file, tmp_path_factory):
    """The grid under the local process pool (2 workers, 1 thread each), through the CLI."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    proc = cli("sweep", spec_file, "-o", out, "--executor", "local", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ------------------------------------------------------------------------------------------------
# the spec


def test_expansion_shares_the_scan_and_baseline_and_orders_stages(planted_dir):
    from melayer.sweeps import expand

    cells = expand(grid(planted_dir))
    kinds = [c.command for c in cells]
    assert kinds.count("compare") == 6 and kinds.count("eval") == 1 and kinds.count("scan") == 1
    assert [c.stage for c in cells] == sorted(c.stage for c in cells)
    scan = next(c for c in cells if c.command == "scan")
    base = next(c for c in cells if c.command == "eval")
    assert base.settings["rate"] == 0.0 and base.stage == 1
    for c in cells:
        if c.command == "compare":
            assert c.needs == {"baseline": base.id, "scan": scan.id} and c.stage == 2
    assert len({c.id for c in cells}) == len(cells)
    # the same spec expands to the same ids; the limit may grow without a new directory (the run extends)
    again = expand(grid(planted_dir))
    assert [c.id for c in again] == [c.id for c in cells]
    bigger = grid(planted_dir)
    bigger["runs"][0]["limit"] = 8
    assert [c.id for c in expand(bigger)] == [c.id for c in cells]
    # a given ME layer needs no scan cell
    given = grid(planted_dir)
    given["runs"][0]["me_layer"] = 2
    assert "scan" not in [c.command for c in expand(given)]


def test_finetune_cells_are_the_grid_of_rates_rules_and_seeds(planted_dir):
    from melayer.sweeps import expand

    spec = {"models": [str(planted_dir)], "runs": [{"command": "finetune", "method": "sft", "rates": [0, 0.01],
                                                   "select": ["activation", "weight"], "seeds": [0, 1],
                                                   "options": {"max_steps": 2}}]}
    cells = expand(spec)
    # rate 0 ignores the select rule: 2 seeds x (1 unmasked + 2 rules at 0.01)
    assert len(cells) == 6 and {c.command for c in cells} == {"finetune"} and all(not c.needs for c in cells)
    assert {(c.settings["rate"], c.settings["select"], c.settings["seed"]) for c in cells} == {
        (0.0, None, 0), (0.0, None, 1), (0.01, "activation", 0), (0.01, "weight", 0), (0.01, "activation", 1),
        (0.01, "weight", 1)}


@pytest.mark.parametrize("change, message", [
    ({"runs": [{"command": "nope"}]}, "'command' must be one of"),
    ({"runs": [{"command": "compare", "tasks": ["nope"], "rates": [0.1]}]}, "unknown task 'nope'"),
    ({"runs": [{"command": "compare", "tasks": ["lambada"], "rates": [1.5]}]}, "out of range"),
    ({"runs": [{"command": "compare", "tasks": ["lambada"], "rates": [0.0]}]}, "at least one rate > 0 or a method"),
    ({"runs": [{"command": "compare", "tasks": ["lambada"], "method": ["nope"]}]}, r"runs\[1\]: .*unknown method"),
    ({"runs": [{"command": "eval", "tasks": ["lambada"], "method": ["act:tau=2"]}]}, r"runs\[1\]: .*tau"),
    ({"runs": [{"command": "eval", "tasks": ["lambada"], "method": [{"act": 1}]}]}, "is not a method spec"),
    ({"runs": [{"command": "eval", "tasks": ["lambada"], "method": ["act", "act"]}]}, "given twice"),
    ({"runs": [{"command": "compare", "tasks": ["lambada"], "rates": [0.1], "select": ["max"]}]}, "select rule"),
    ({"runs": [{"command": "scan", "tasks": ["lambada"]}]}, "unknown key 'tasks'"),
    ({"runs": [{"command": "sinks", "options": {"epsilom": 0.3}}]}, "sinks has no option 'epsilom'; it takes"),
    ({"runs": [{"command": "sinks", "options": {"windows": "32"}}]}, "option windows must be int"),
    ({"runs": [{"command": "rigidity", "options": {"n_prompts": True}}]}, "option n_prompts must be int or null"),
    ({"runs": [{"command": "weights"}]}, "'command' must be one of"),  # reads a checkpoint, not a loaded model
    ({"runs": [{"command": "eval", "tasks": ["lambada"], "limit": 0}]}, "positive integer"),
    ({"runs": []}, "non-empty list"),
    ({"modles": ["x"]}, "unknown key 'modles'"),
])
def test_bad_specs_are_one_line_errors(planted_dir, change, message):
    from melayer.sweeps import expand

    spec = {"models": [str(planted_dir)], "runs": [{"command": "scan"}], **change}
    with pytest.raises(MelayerError, match=message):
        expand(spec)


def test_fingerprint_is_the_model_not_the_path(planted_dir, tmp_path, monkeypatch):
    from melayer.sweeps.fingerprint import model_fingerprint

    copy = tmp_path / "m"
    shutil.copytree(planted_dir, copy)
    monkeypatch.chdir(tmp_path)
    assert model_fingerprint("m") == model_fingerprint(str(copy.resolve()))
    before = model_fingerprint("m")["digest"]
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights at the same path: a new fingerprint, so new cells
    weights.write_bytes(bytes(data))
    assert model_fingerprint("m")["digest"] != before
    with pytest.raises(MelayerError, match="no such file"):
        model_fingerprint("./missing")


def test_a_cell_is_finished_only_with_the_same_settings_and_model(planted_dir, tmp_path):
    from melayer.sweeps import expand
    from melayer.sweeps.cell import DONE, cell_dir, finished
    from melayer.util.io import write_json

    cell = expand(grid(planted_dir))[0].to_dict()
    assert finished(tmp_path, cell) is None  # nothing there yet
    record = {"status": "done", "settings": cell["settings"], "fingerprint": cell["fingerprint"]}
    write_json(cell_dir(tmp_path, cell["id"]) / DONE, record)
    assert finished(tmp_path, cell) == record
    more = {**cell, "settings": {**cell["settings"], "batch_size": 2}}  # same directory, other settings: redo
    other = {**cell, "fingerprint": {**cell["fingerprint"], "digest": "0" * 16}}
    assert finished(tmp_path, more) is None and finished(tmp_path, other) is None
    write_json(cell_dir(tmp_path, cell["id"]) / DONE, {**record, "status": "failed"})
    assert finished(tmp_path, cell) is None


def test_benjamini_hochberg_adjustment():
    from melayer.sweeps.table import adjust

    table = [{"mcnemar_p": 0.01}, {"mcnemar_p": 0.04}, {"mcnemar_p": None}, {"mcnemar_p": 0.03}]
    adjust(table)
    # sorted 0.01, 0.03, 0.04 (m = 3): 0.04 * 3/3, min(0.03 * 3/2, 0.04), 0.01 * 3/1
    assert [r.get("p_bh") for r in table] == pytest.approx([0.03, 0.04, None, 0.04])
    assert [r.get("significant_bh") for r in table] == [True, True, None, True]


# ------------------------------------------------------------------------------------------------
# running: each executor, identical tables


def test_local_pool_runs_every_cell_and_writes_the_table(local_run, planted_dir):
    out, _ = local_run
    state = json.loads((out / "sweep.json").read_text())
    assert state["schema"] == "melayer.sweep/1" and len(state["ran"]) == 8 and not state["failed"]
    table = json.loads((out / "table.json").read_text())
    assert table["schema"] == "melayer.sweep_table/1" and table["multiple_comparisons"]["method"] == "benjamini-hochberg"
    cmp_rows = [r for r in table["rows"] if r["command"] == "compare"]
    assert len(cmp_rows) == 12  # 6 cells x (acc, ppl)
    assert {r["rate"] for r in cmp_rows} == {0.05, 0.1, 0.2} and {r["select"] for r in cmp_rows} == {"activation", "weight"}
    for r in cmp_rows:  # the cell's own paired statistics, read back unchanged
        cell = out / "cells" / r["cell"]
        d = json.loads((cell / "compare.json").read_text())
        m = d["per_rate"][1]["metrics"][r["metric"]]
        assert r["diff"] == m["vs_baseline"]["diff"] and r["value"] == m["value"] and r["me_layer"] == 2
        assert r["k"] == int(r["rate"] * 64) and r["sink_rate"] == d["per_rate"][1]["sink_rate"]
        if r["metric"] == "acc":
            assert r["mcnemar_p"] == m["mcnemar"]["p"] and r["p_bh"] >= r["mcnemar_p"]
        # the shared baseline was reused, not recomputed: the rate-0 records are the baseline cell's
        base = next(p for p in (out / "cells").iterdir() if p.name.startswith("eval_"))
        assert read_jsonl(cell / "rate_0" / "samples.jsonl") == read_jsonl(base / "samples.jsonl")
    assert any(r["diff"] != 0 for r in cmp_rows if r["metric"] == "ppl")  # the mask does something
    assert (out / "table.csv").read_text().startswith("cell,command,model")
    assert (out / "table.png").stat().st_size > 1000


def test_a_second_run_skips_every_finished_cell(local_run, spec_file):
    out, _ = local_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    proc = cli("sweep", spec_file, "-o", out, "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 finished before, 0 ran" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_submitit_local_cluster_gives_the_identical_table(local_run, spec_file, tmp_path):
    pytest.importorskip("submitit")
    from melayer.sweeps import ExecutorOptions, run
    from melayer.sweeps.table import aggregate

    res = run(spec_file, tmp_path / "sweep", "slurm", options=ExecutorOptions(slurm_cluster="local", timeout_min=20))
    assert not res.failed and len(res.ran) == 8
    assert list((tmp_path / "sweep" / "logs" / "submitit").iterdir())  # submitit's own logs
    assert aggregate(tmp_path / "sweep")["rows"] == rows(local_run[0])


def test_ray_gives_the_identical_table(local_run, spec_file, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "sweep"
    proc = cli("sweep", spec_file, "-o", out, "--executor", "ray", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(out) == rows(local_run[0])


# ------------------------------------------------------------------------------------------------
# kills and torn cells


def test_a_killed_sweep_finishes_only_the_missing_cells(local_run, spec_file, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "melayer", "sweep", str(spec_file), "-o", str(out),
                             "--workers", "1", "--no-table"], env={**os.environ, **ENV}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and len(list(out.glob("cells/compare_*/cell.json"))) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool workers, mid-way
        proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    assert 4 <= len(done_before) < 8  # scan + baseline + at least 2 of the 6 compare cells
    # tear one unfinished cell the way a kill mid-write leaves it: no cell.json, half a record at the end
    torn = next(p for p in (local_run[0] / "cells").iterdir() if p.name not in done_before)
    shutil.rmtree(out / "cells" / torn.name, ignore_errors=True)
    shutil.copytree(torn, out / "cells" / torn.name)
    (out / "cells" / torn.name / "cell.json").unlink()
    log = next((out / "cells" / torn.name).glob("rate_0.*/samples.jsonl"))
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])

    proc2 = cli("sweep", spec_file, "-o", out, "--workers", "1")
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    state = json.loads((out / "sweep.json").read_text())
    assert sorted(state["skipped"]) == sorted(done_before) and len(state["ran"]) == 8 - len(done_before)
    assert {p: (out / "cells" / p / "cell.json").stat().st_mtime_ns for p in done_before} == done_before
    recs = read_jsonl(log)
    assert len(recs) == 4 and len({r["id"] for r in recs}) == 4  # nothing lost, nothing repeated
    # the resumed samples ran in the same batches as in one go (the torn cell's half-saved batch is rerun whole):
    # the table is identical, every float
    assert rows(out) == rows(local_run[0])


# ------------------------------------------------------------------------------------------------
# the CLI's bad input and the Python entry point


@pytest.mark.parametrize("args, message", [
    (["sweep", "missing.yaml"], "no such sweep spec"),
    (["sweep", "{spec}", "--executor", "k8s"], "'k8s' is not one of 'local', 'slurm', 'ray'"),
    (["sweep", "{spec}", "--threads", "0"], "--threads must be >= 1"),
    (["aggregate", "{tmp}"], "not a sweep output directory"),
    (["sweep", "aggregate", "{tmp}"], "not a sweep output directory"),
])
def test_cli_bad_input_is_one_line(spec_file, tmp_path, args, message):
    args = [a.format(spec=spec_file, tmp=tmp_path) for a in args]
    proc = cli(*args, "-o", tmp_path / "out") if args[0] == "sweep" else cli(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("melayer: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_melayer_sweep_is_the_function_and_dry_runs(local_run, spec_file):
    import melayer
    import melayer.sweeps  # importing the machinery does not replace the verb

    assert melayer.sweep is melayer.sweeps.run
    res = melayer.sweep(spec_file, local_run[0], dry_run=True)
    assert len(res.cells) == 8 and len(res.skipped) == 8 and not res.records


def test_every_registered_analysis_is_a_sweep_command(planted_dir, tmp_path):
    """Sweeps take their analyses from the one registry: each is a command whose cell calls the registered
    function with the block's options and writes the registered file; the table lists its registered metrics."""
    import melayer
    from melayer.reporting.results import analyses
    from melayer.sweeps import ExecutorOptions, run
    from melayer.sweeps.spec import COMMANDS
    from melayer.sweeps.table import aggregate

    assert set(analyses()) == {"scan", "explain", "rigidity", "sinks"} and set(analyses()) <= set(COMMANDS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is Paris, and the capital of Germany is Berlin.\n"
                       "My favourite colour is dark blue, and my favourite food is bread with butter.\n")
    spec = {"models": [str(planted_dir)], "runs": [
        {"command": "sinks", "prompts": str(prompts), "options": {"epsilon": 0.2, "min_tokens": 4}},
        {"command": "rigidity", "prompts": str(prompts), "options": {"n_prompts": None}}]}
    res = run(spec, tmp_path / "sweep", "local", options=ExecutorOptions(workers=1))
    assert not res.failed and len(res.ran) == 2
    cells = {json.loads((tmp_path / "sweep" / "cells" / c / "cell.json").read_text())["command"]: c for c in res.ran}
    sinks = json.loads((tmp_path / "sweep" / "cells" / cells["sinks"] / "sinks.json").read_text())
    lm = melayer.load(str(planted_dir), progress=False)
    direct = melayer.sinks(lm, melayer.util.io.read_prompts(str(prompts)), epsilon=0.2, min_tokens=4,
                           batch_size=8, progress=False).to_dict()
    assert sinks["settings"]["epsilon"] == 0.2 and sinks["alpha_first"] == direct["alpha_first"]
    assert (tmp_path / "sweep" / "cells" / cells["rigidity"] / "rigidity.json").is_file()
    table = {(r["command"], r["metric"]): r["value"] for r in aggregate(tmp_path / "sweep")["rows"]}
    assert table[("sinks", "sink_rate")] == sinks["sink_rate"] and ("sinks", "first_sink_layer") in table
    assert table[("rigidity", "me_layer")] == direct["me_layer"]


def test_finetune_cell_trains_with_its_mask_and_is_skipped_after(planted_dir, tmp_path):
    pytest.importorskip("trl")
    from melayer.sweeps import ExecutorOptions, run
    from melayer.sweeps.table import aggregate

    spec = {"models": [str(planted_dir)], "runs": [{"command": "finetune", "method": "sft", "rates": [0.1],
                                                   "options": {"limit": 8, "max_steps": 1, "per_device_train_batch_size": 2,
                                                               "max_length": 512}}]}
    res = run(spec, tmp_path / "sweep", "local", options=ExecutorOptions(workers=1))
    assert not res.failed and len(res.ran) == 1
    cell = tmp_path / "sweep" / "cells" / res.ran[0]
    done = json.loads((cell / "finetune.json").read_text())
    assert done["wemask"]["rate"] == 0.1 and done["wemask"]["k"] == 6 and (cell / "adapter_model.safetensors").exists()
    row = aggregate(tmp_path / "sweep")["rows"][0]
    assert row["metric"] == "final_loss" and row["value"] == done["final_loss"]
    assert run(spec, tmp_path / "sweep", "local").skipped == res.ran


def test_method_cells_run_registered_interventions_like_compare(planted_dir, tmp_path):
    """``method:`` in eval and compare blocks: one cell per intervention against the shared baseline, giving the
    records and paired statistics that ``melayer.compare`` gives for the same method."""
    import melayer
    from melayer.sweeps import ExecutorOptions, expand, run
    from melayer.sweeps.table import aggregate

    common = {"tasks": ["lambada"], "limit": 4, "batch_size": 4}
    spec = {"models": [str(planted_dir)], "runs": [
        {"command": "compare", **common, "method": ["act:heads=all", "wemask_before:rate=0.1"], "n_boot": 200},
        {"command": "eval", **common, "method": "zerotuning:gamma=2"}]}
    cells = expand(spec)
    assert sorted(c.command for c in cells) == ["compare", "compare", "eval", "eval", "scan"]
    methods = {c.settings.get("method"): c for c in cells if c.stage == 2}
    assert set(methods) == {"act:heads=all", "wemask_before:rate=0.1", "zerotuning:gamma=2.0"}  # canonical labels
    assert all("-rate-0.1" in c.id or "act" in c.id or "zerotuning" in c.id for c in methods.values())
    res = run(spec, tmp_path / "sweep", "local", options=ExecutorOptions(workers=1))
    assert not res.failed and len(res.ran) == 5
    table = aggregate(tmp_path / "sweep")
    rows = {(r["method"], r["metric"]): r for r in table["rows"] if r["command"] == "compare"}
    assert {m for m, _ in rows} == {"act:heads=all", "wemask_before:rate=0.1"}

    lm = melayer.load(str(planted_dir), progress=False)
    for label in ("act:heads=all", "wemask_before:rate=0.1"):
        cell = tmp_path / "sweep" / "cells" / methods[label].id
        direct = melayer.compare(lm, "lambada", [0.0], limit=4, batch_size=4, n_boot=200, me_layer=2,
                                 methods=[label], output=tmp_path / label.replace(":", "_"), progress=False)
        mine = json.loads((cell / "compare.json").read_text())["per_method"][0]
        want = direct.to_dict()["per_method"][0]
        assert mine["metrics"]["acc"]["vs_baseline"] == want["metrics"]["acc"]["vs_baseline"]
        assert mine["massive_downstream"] == pytest.approx(want["massive_downstream"])
        for metric in ("acc", "ppl"):
            r = rows[(label, metric)]
            assert r["diff"] == want["metrics"][metric]["vs_baseline"]["diff"] and r["rate"] is None
            assert r["massive_downstream"] == pytest.approx(want["massive_downstream"])
        assert rows[(label, "acc")]["p_bh"] >= rows[(label, "acc")]["mcnemar_p"]
    eval_cell = tmp_path / "sweep" / "cells" / methods["zerotuning:gamma=2.0"].id
    done = json.loads((eval_cell / "eval.json").read_text())
    assert "ZeroTuning gamma=2" in done["settings"]["intervention"]["rule"]
    base = next(c for c in cells if c.command == "eval" and not c.settings.get("method"))
    base_ppl = json.loads((tmp_path / "sweep" / "cells" / base.id / "eval.json").read_text())["metrics"]["ppl"]
    assert done["metrics"]["ppl"]["value"] != base_ppl["value"]  # the intervention was applied
