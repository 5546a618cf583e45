"""bench/: every benchmark script runs in its tiny setting and writes well-formed results.

Never a speed assertion (the machine is noisy): the figures of a --quick run are not meaningful;
what is checked is that each script really runs its comparison end to end (real Ray, real Serve
over HTTP on 127.0.0.1, the real baselines) and records every figure as a finite number, that the
results file keeps keys written by others, and that RESULTS.md renders from it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402

# The figures each script must write (dotted paths into its results key).
REQUIRED = {
    "ingest": ["ratio", "ratio_stats.median", "rayfine_images_per_s.median", "dataloader_images_per_s.median", "images",
               "photos.ratio", "photos.rayfine_images_per_s.median", "photos.dataloader_images_per_s.median",
               "phone_photos.ratio", "phone_photos.ratio_vs_whole_decode", "phone_photos.torchvision_images_per_s.median",
               "phone_photos.max_level_difference_vs_whole_decode"],
    "train_overhead": ["ratio", "ratio_stats.median", "epoch_ratio", "rayfine_samples_per_s.median",
                       "ddp_samples_per_s.median", "rayfine_startup_s.median", "ddp_startup_s.median",
                       "one_worker.ratio", "one_worker.rayfine_samples_per_s.median", "one_worker.ddp_samples_per_s.median"],
    "serve": ["batching_gain_c32", "batching_gain_c32_stats.median", "floor.p50_ms", "floor.items_per_s",
              *[f"servers.{s}.c{c}.{m}" for s in ("batched", "unbatched", "plain") for c in (1, 8, 32)
                for m in ("rps.median", "p50_ms", "p99_ms", "loadgen_cpu_ms_per_request")]],
    "memory": [f"{run}.{m}" for run in ("digits", "rotten_tomatoes")
               for m in ("driver_peak_rss_mib", "driver_or_reaped_peak_rss_mib", "worker_peak_rss_mib", "worker_peak_uss_mib")],
    "end_to_end": ["total_s", "ray_start_s", "search_s", "evaluation_s", "deploy_s", "test_accuracy"],
    "asha": ["compute_ratio", "worker_seconds_ratio", "best_acc_asha", "best_acc_full", "accuracy_gap",
             "compute_ratio_stats.median", "accuracy_gap_stats.median", "held_worker_seconds_ratio_stats.median",
             "per_seed.0.asha.held_worker_s", "per_seed.0.fifo.held_worker_s"],
    "asha_curves": ["per_seed.0.fifo_best_test_accuracy", "per_seed.0.trials.0.epochs.0.test_accuracy"],
    "halving": ["compute_ratio", "accuracy_gap", "compute_ratio_stats.median", "accuracy_gap_stats.median",
                "per_seed.0.best_acc_halving", "per_seed.0.epochs_compared"],  # after asha_curves: its FIFO side
    "asha_replay": ["stopping_compute_ratio.median", "promotion_compute_ratio.median", "promotion_accuracy_gap.median",
                    "per_seed.0.full.best_test_accuracy",  # after asha_curves: it replays that record
                    "sweep.0.compute_ratio.median", "sweep.0.accuracy_gap.median", "pooled.0.compute_ratio.median"],
}


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"non-finite number {constant} in the results file")

    return json.loads(text, parse_constant=refuse)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[int(part)] if isinstance(d, list) else d[part]
    return d


def _numbers(value, where: str):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        assert math.isfinite(value), f"{where} = {value}"
    elif isinstance(value, dict):
        for k, v in value.items():
            _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _numbers(v, f"{where}[{i}]")


def test_results_file_merges_and_keeps_other_keys(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"reliability": {"recovered": 3}, "ingest": {"ratio": 0.5}}))
    common.write_result(path, "ingest", {"ratio": 1.25, "ratio_stats": common.summary([1.0, 1.25, 2.0])}, quick=True)
    data = _strict_json(path.read_text())
    assert data["reliability"] == {"recovered": 3}  # another script's figures survive
    assert data["ingest"]["ratio"] == 1.25 and data["ingest"]["quick"] is True
    assert data["ingest"]["ratio_stats"]["median"] == 1.25 and data["ingest"]["ratio_stats"]["n"] == 3
    assert data["machine"]["cpus"] >= 1 and data["machine"]["ray"] and data["machine"]["torch"]
    # Each section names the machine it ran on; the page shows it under the section.
    assert data["ingest"]["measured_on"] == common.measured_on(data["machine"])
    assert data["machine"]["torch_cpu_capability"] and "/" in data["machine"]["cpu_family_model"]
    with pytest.raises(ValueError, match="not a finite number"):
        common.write_result(path, "ingest", {"ratio": float("nan")}, quick=True)
    assert _strict_json(path.read_text())["ingest"]["ratio"] == 1.25  # a bad figure is never written
    page = report.render(data)
    assert "## reliability" in page and "Machine: " in page
    assert f"UTC on {data['ingest']['measured_on']}_" in page
    older = {"cpus": 2, "cpu_model": "AMD EPYC", "memory_gib": 23.5}  # a machine block of an earlier results file
    assert common.measured_on(older) == "2 CPUs (AMD EPYC), 23.5 GiB"


def test_results_page_is_the_results_file_with_the_notes():
    """RESULTS.md is rendered, never edited: each section's "What bounds it" comes from NOTES.md, whose
    record keeps the history, and the committed page is what report.py makes of results.json and NOTES.md."""
    found = report.bounds(report.NOTES.read_text())
    assert set(report.ORDER) <= set(found)
    for key in report.ORDER:
        assert found[key].startswith("- ") and "### " not in found[key], key
    results = common.read_results(common.RESULTS)
    page = report.render(results)
    assert page == (BENCH / "RESULTS.md").read_text(), "run `python bench/report.py` after editing NOTES.md"
    section = page.split("\n## ingest\n")[1].split("\n## ")[0]
    assert found["ingest"] in section and "[NOTES.md, ingest](NOTES.md#ingest)" in section
    notes = "## ingest\n\n### What bounds it\n\n- one line\n\n### Record\n\n- old\n\n## serve\n\n### Record\n\n- old\n"
    assert report.bounds(notes) == {"ingest": "- one line"}
    assert "What bounds it:\n\n(not written yet)" in report.render({"serve": results["serve"]}, notes)


def test_statistics():
    s = common.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert common.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


@pytest.mark.bench
@pytest.mark.integration
def test_every_bench_script_runs_in_its_tiny_setting(tmp_path):
    """One results file for all scripts, as `make bench` writes it; then RESULTS.md from it."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"reliability": {"kept": True}}))
    for name in REQUIRED:
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--results", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        data = _strict_json(path.read_text())
        result = data[name]
        for key in REQUIRED[name]:
            value = _get(result, key)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, key, value)
        _numbers(result, name)
        assert result["quick"] is True and result["compared"]
    data = _strict_json(path.read_text())
    assert data["reliability"] == {"kept": True}
    # The comparisons really ran: both sides saw all the data, the same configs, the same answers.
    assert data["serve"]["same_answers"] is True
    assert all(data["serve"]["servers"][s][f"c{c}"]["errors"] == 0 for s in ("batched", "unbatched", "plain")
               for c in (1, 8, 32))
    assert data["asha"]["per_seed"][0]["fifo"]["epochs"] == data["asha"]["per_seed"][0]["fifo"]["epochs_full_budget"]
    halving = data["halving"]["per_seed"][0]  # every epoch it trained is the one FIFO trained
    assert halving["epochs_compared"] == halving["epochs"] and halving["reproduced"] == halving["epochs"]
    assert data["end_to_end"]["exit_code"] == 0 and data["end_to_end"]["first_answer"]["label"] in [str(d) for d in range(10)]
    assert data["ingest"]["phone_photos"]["max_level_difference_vs_whole_decode"] <= 2
    page = report.render(data)
    for heading in ("## Headline figures", *(f"## {k}" for k in REQUIRED), "## reliability", "Phone photos:"):
        assert heading in page, heading


def _curves(*vals: list[float]) -> dict:
    """A recorded seed of asha_curves: one trial per list of per-epoch validation accuracies."""
    return {"trials": [{"trial": f"t{i}", "config": {},
                        "epochs": [{"epoch": e + 1, "val_accuracy": v, "val_loss": 1 - v, "epoch_s": 1.0,
                                    "test_accuracy": v} for e, v in enumerate(vs)]}
                       for i, vs in enumerate(vals)]}


def test_replayed_schedulers_on_known_curves():
    """bench/asha_replay.py: Ray Tune's own ASHA bracket, and ASHA with promotions, one slot."""
    import asha_replay

    seed = _curves([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.3, 0.4, 0.5, 0.6], [0.9, 0.95, 0.96, 0.97])
    # Trials arriving in increasing order of quality each beat the rung's cutoff of those before
    # them: asynchronous ASHA stops none of them.
    trials = [asha_replay.Trial(i, r) for i, r in enumerate(seed["trials"])]
    asha_replay.replay_stopping(trials, max_t=4, grace=1, eta=2, slots=1, start_s=0)
    assert [t.ran for t in trials] == [4, 4, 4, 4]
    # With promotions a trial waits at its rung until it is in the rung's top half: t1 is promoted
    # once t0 is behind it, t3 past both rungs; 8 of 16 epochs, as synchronous successive halving.
    promoted = asha_replay.replay_seed(seed, "promotion", max_t=4, grace=1, eta=2, slots=1, start_s=0)
    assert promoted["stopped_after"] == [1, 1, 2, 4] and promoted["epochs"] == 8
    assert (promoted["winner"], promoted["winner_epoch"], promoted["best_test_accuracy"]) == ("t3", 4, 0.97)
    synchronous = asha_replay.replay_seed(seed, "synchronous", max_t=4, grace=1, eta=2)
    assert synchronous["stopped_after"] == [1, 1, 2, 4] and synchronous["winner"] == "t3"
    assert asha_replay.rung_milestones(8, 1, 2) == [1, 2, 4]
    # A grace period at max_t leaves no rung: every rule runs every trial to the end (the sweep's
    # grace 2 on the tiny setting's 2 epochs).
    for rule in asha_replay.RULES:
        assert asha_replay.replay_seed(seed, rule, max_t=4, grace=4, eta=2, slots=1, start_s=0)["stopped_after"] == [4] * 4
    # The full budget's winner, and the epochs within one validation image of it (steps of 0.01 here).
    full = asha_replay.full_budget(seed, max_t=4)
    assert (full["winner"], full["epochs"], full["near_best_epochs"], full["near_best_test_min"]) == ("t3", 16, 2, 0.96)
    # rayfine's pick: ties go to the earlier epoch.
    tied = [asha_replay.Trial(0, _curves([0.5, 0.9, 0.9])["trials"][0])]
    tied[0].ran = 3
    assert asha_replay.winner(tied)[1] == 2
    # The sweep: every rule at each grace period x reduction factor, over the seeds given.
    rows = asha_replay.sweep([seed, seed], max_t=4)
    assert len(rows) == 3 * len(asha_replay.SWEEP_GRACE) * len(asha_replay.SWEEP_ETA)
    sync = next(r for r in rows if (r["rule"], r["grace_period"], r["reduction_factor"]) == ("synchronous", 1, 2))
    assert sync["compute_ratio"]["values"] == [0.5, 0.5] and sync["accuracy_gap"]["median"] == 0.0
    assert sync["goal_met"] is False  # half the epochs: over the goal's 0.35
    sync4 = next(r for r in rows if (r["rule"], r["grace_period"], r["reduction_factor"]) == ("synchronous", 1, 4))
    assert sync4["compute_ratio"]["median"] == 7 / 16  # one rung at epoch 1, then the best one to 4
    # More configurations: draws from both seeds' trials together, 4, 6 and all 8 of them. With all
    # 8 (t3 and t1 twice), whole rungs take 8 to epoch 1, t3 and t1 twice to 2, t3 twice to 4: 16 of
    # 32 epochs, and the winner is the full budget's.
    pooled = asha_replay.pooled([seed, seed], max_t=4, grace=1, eta=2, draws=3)
    assert [(r["configs"], r["rule"], r["draws"]) for r in pooled] == [
        (n, rule, 3) for n in (4, 6, 8) for rule in asha_replay.RULES]
    all8 = next(r for r in pooled if (r["configs"], r["rule"]) == (8, "synchronous"))
    assert all8["compute_ratio"]["values"] == [0.5] * 3 and all8["accuracy_gap"]["values"] == [0.0] * 3


def test_halving_compared_with_the_fifo_record():
    """bench/halving.py: the halving search's epochs against FIFO's, epoch by epoch."""
    import halving

    keys = ["train.lr"]
    fifo = {(0.1,): [{"epoch": 1, "val_accuracy": 0.5, "epoch_s": 2.0}, {"epoch": 2, "val_accuracy": 0.7, "epoch_s": 2.0}],
            (0.2,): [{"epoch": 1, "val_accuracy": 0.6, "epoch_s": 2.0}, {"epoch": 2, "val_accuracy": 0.8, "epoch_s": 2.0}]}
    record = halving.as_curves(fifo, keys)
    assert record["trials"][0]["config"] == {"train.lr": 0.1}
    ran = {(0.1,): fifo[(0.1,)][:1], (0.2,): [fifo[(0.2,)][0], {**fifo[(0.2,)][1], "val_accuracy": 0.79}]}
    got = halving.compare(ran, record, keys)
    assert (got["epochs"], got["epochs_fifo"], got["compute_ratio"]) == (3, 4, 0.75)
    assert (got["reproduced"], got["epochs_compared"], got["stopped_after"]) == (2, 3, [1, 2])
    assert got["worker_s"] == 6.0 and got["worker_s_fifo"] == 8.0
    with pytest.raises(RuntimeError, match="different configs"):
        halving.compare({(0.3,): []}, record, keys)
