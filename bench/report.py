"""Render the results file as a readable page: bench/results.json -> bench/RESULTS.md.

    python bench/report.py                                  # bench/results.json -> bench/RESULTS.md
    python bench/report.py RESULTS_JSON OUT_MD

Every figure in the results file is shown; keys this script does not know (e.g. ``reliability``,
written by other scripts) are listed as they are. The text on what each figure compares comes
from the results file itself; what bounds each figure comes from bench/NOTES.md, which keeps the record
behind it (every measurement, profile and tried change) by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ORDER = ("asha", "halving", "halving_held_out", "asha_replay", "asha_curves", "train_overhead", "ingest", "serve", "end_to_end", "memory")

NOTES = Path(__file__).resolve().parent / "NOTES.md"


def bounds(notes_text: str) -> dict[str, str]:
    """Each section's "What bounds it" part of NOTES.md (kept by hand, beside the record behind it)."""
    found = {}
    for part in re.split(r"^## ", notes_text, flags=re.MULTILINE)[1:]:
        key, _, body = part.partition("\n")
        what = body.split("### What bounds it\n", 1)
        if len(what) == 2:
            found[key.strip()] = what[1].split("\n### ", 1)[0].strip()
    return found


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _spread(stats: dict, digits: int = 3) -> str:
    return (f"median {_fmt(stats['median'], digits)} (min {_fmt(stats['min'], digits)}, max {_fmt(stats['max'], digits)}, "
            f"n={stats['n']})")


def headline_rows(results: dict) -> list[list[str]]:
    rows = []
    for key, figure, stats_key in (("asha", "compute_ratio", "compute_ratio_stats"),
                                   ("asha", "accuracy_gap", "accuracy_gap_stats"),
                                   ("halving", "compute_ratio", "compute_ratio_stats"),
                                   ("halving", "accuracy_gap", "accuracy_gap_stats"),
                                   ("halving_held_out", "compute_ratio", "compute_ratio_stats"),
                                   ("halving_held_out", "accuracy_gap", "accuracy_gap_stats"),
                                   ("train_overhead", "ratio", "ratio_stats"),
                                   ("ingest", "ratio", "ratio_stats"),
                                   ("serve", "batching_gain_c32", "batching_gain_c32_stats")):
        r = results.get(key)
        if not r or figure not in r or stats_key not in r:
            continue
        stats = r[stats_key]
        # halving's FIFO side is asha_curves' record (another run, another day), not run beside it.
        against = " (against the asha_curves FIFO record)" if key == "halving" else ""
        rows.append([f"`{key}.{figure}`{against}", _fmt(r[figure]), f"[{_fmt(stats['min'])}, {_fmt(stats['max'])}]",
                     str(stats["n"]), r.get("goal", ""), _fmt(r.get("goal_met", ""))])
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def section_asha(r: dict) -> list[str]:
    s = r["setting"]
    out = [f"Setting: {s['configs_per_seed']} configs per seed, seeds {s['seeds']}, max {s['max_epochs']} epochs, grace "
           f"{s['grace_period']}, reduction factor {s['reduction_factor']}; {s['dataset']} at {s['image_size']} px, "
           f"{s['model']}; search space {s['search_space']}; per trial {s['trial_resources']}.", ""]
    rows = []
    for p in r["per_seed"]:
        rows.append([str(p["seed"]), f"{p['asha']['epochs']}/{p['fifo']['epochs']}", _fmt(p["compute_ratio"]),
                     _fmt(p["worker_seconds_ratio"]), _fmt(p["wall_ratio"]), _fmt(p["best_acc_asha"], 4),
                     _fmt(p["best_acc_full"], 4), f"{p['accuracy_gap']:+.4f}",
                     " ".join(map(str, p["asha"]["stopped_after"]))])
    out += table(["seed", "epochs ASHA/FIFO", "compute_ratio", "worker-s ratio", "wall ratio", "best_acc_asha",
                  "best_acc_full", "accuracy_gap", "epochs per trial under ASHA"], rows)
    seconds = [[str(p["seed"])] + [f"{_fmt(p[side].get(key), 1)}" if key in p[side] else "not recorded"
                                   for key in ("worker_s", "held_worker_s", "wall_s") for side in ("asha", "fifo")]
               for p in r["per_seed"]]
    out += ["", ("Seconds behind the ratios (worker-seconds: the trials' epochs; held: each trial from its start to "
                 "its last result; wall: the search):"), ""]
    out += table(["seed", "worker-s ASHA", "worker-s FIFO", "held worker-s ASHA", "held worker-s FIFO",
                  "wall s ASHA", "wall s FIFO"], seconds)
    out += ["", f"- compute_ratio: {_spread(r['compute_ratio_stats'])}",
            f"- worker_seconds_ratio (the trials' epochs): {_spread(r['worker_seconds_ratio_stats'])}",
            *([f"- held_worker_seconds_ratio (each trial from its start to its last result, its Train worker "
               f"group's start included): {_spread(r['held_worker_seconds_ratio_stats'])}"]
              if "held_worker_seconds_ratio_stats" in r else []),
            f"- wall_ratio (ASHA search wall time / FIFO's): {_spread(r['wall_ratio_stats'])}",
            f"- best_acc_asha: {_spread(r['best_acc_asha_stats'], 4)}; best_acc_full: {_spread(r['best_acc_full_stats'], 4)}",
            (f"- accuracy_gap: {_spread(r['accuracy_gap_stats'], 4)}: the median of the seeds' gaps, each the same "
             "seed's FIFO winner minus its ASHA winner. The median best_acc_full minus the median best_acc_asha is "
             f"{r['best_acc_full_stats']['median'] - r['best_acc_asha_stats']['median']:+.4f}: those medians can come "
             "from different seeds.")]
    return out


def section_halving(r: dict) -> list[str]:
    s = r["setting"]
    out = [f"Setting: the asha setting ({s['configs_per_seed']} configs per seed, seeds {s['seeds']}, max "
           f"{s['max_epochs']} epochs, {s['trial_resources']} per trial) with tune.scheduler=halving, grace "
           f"{s['grace_period']}, reduction factor {s['reduction_factor']}.", ""]
    rows = [[str(p["seed"]), f"{p['epochs']}/{p['epochs_fifo']}", _fmt(p["compute_ratio"]), _fmt(p["worker_seconds_ratio"]),
             _fmt(p["best_acc_halving"], 4), _fmt(p["best_acc_full"], 4), f"{p['accuracy_gap']:+.4f}",
             f"{p['reproduced']}/{p['epochs_compared']}", f"{p['wall_s']:.0f}", " ".join(map(str, p["stopped_after"]))]
            for p in r["per_seed"]]
    out += table(["seed", "epochs halving/FIFO", "compute_ratio", "worker-s ratio (two runs)", "best_acc_halving",
                  "best_acc_full", "accuracy_gap", "epochs as recorded under FIFO", "search s", "epochs per trial"], rows)
    out += ["", f"- compute_ratio: {_spread(r['compute_ratio_stats'])}",
            f"- accuracy_gap: {_spread(r['accuracy_gap_stats'], 4)}",
            f"- best_acc_halving: {_spread(r['best_acc_halving_stats'], 4)}; best_acc_full: "
            f"{_spread(r['best_acc_full_stats'], 4)}",
            f"- search wall time: {_spread(r['wall_s_stats'], 0)} s"]
    if "wall_ratio_stats" in r:
        out += [f"- wall_ratio (halving search wall time / FIFO's, same script): {_spread(r['wall_ratio_stats'])}"]
    return out


def section_train_overhead(r: dict) -> list[str]:
    c = r["config"]
    out = [f"Setting: {c['preset']} (image {c['image_size']} px, augmentation off), {c['workers']} workers, batch "
           f"{c['batch_size_per_worker']} per worker, {c['epochs']} epochs per run ({c['steady_epochs']} steady), "
           f"{r['repeats']} repeats, rayfine and the plain script alternating.", ""]
    rows = [["steady training samples/s", _spread(r["rayfine_samples_per_s"], 0), _spread(r["ddp_samples_per_s"], 0)],
            ["start-up s (to the start of epoch 1)", _spread(r["rayfine_startup_s"], 1), _spread(r["ddp_startup_s"], 1)],
            ["Ray start s / datasets s", f"{_fmt(r['rayfine_ray_init_s']['median'], 1)} / "
             f"{_fmt(r['rayfine_data_s']['median'], 1)}", "none"]]
    out += table(["", "rayfine (Ray Train)", "plain DDP"], rows)
    out += ["", f"- ratio (training phase): {_spread(r['ratio_stats'])}",
            f"- whole-epoch ratio (training + validation + rayfine's checkpoint and report): {_spread(r['epoch_ratio_stats'])}"]
    runs = r.get("runs") or []
    if runs:
        out += ["", "Each pair (samples/s; rayfine's fit_s is Ray Train's whole fit, its start included):", ""]
        out += table(["pair", "rayfine steady", "rayfine epoch 1", "rayfine fit s", "plain steady", "plain epoch 1",
                      "ratio", "whole-epoch ratio"],
                     [[str(i + 1), _fmt(x["rayfine"]["steady_samples_per_s"], 0),
                       _fmt(x["rayfine"].get("first_epoch_samples_per_s", "-"), 0), _fmt(x["rayfine"].get("fit_s", "-"), 1),
                       _fmt(x["ddp"]["steady_samples_per_s"], 0), _fmt(x["ddp"].get("first_epoch_samples_per_s", "-"), 0),
                       _fmt(x["ratio"]), _fmt(x.get("epoch_ratio", "-"))] for i, x in enumerate(runs)])
    one = r.get("one_worker")
    if one:  # recorded since the script also runs one worker against one plain process
        out += ["", ("One worker against one plain process (no DDP on either side), run right after each pair above: "
                     "Ray's own processes have the other CPU."), ""]
        out += table(["", "rayfine (Ray Train, 1 worker)", "plain PyTorch (1 process)"],
                     [["steady training samples/s", _spread(one["rayfine_samples_per_s"], 0), _spread(one["ddp_samples_per_s"], 0)],
                      ["start-up s (to the start of epoch 1)", _spread(one["rayfine_startup_s"], 1), _spread(one["ddp_startup_s"], 1)]])
        out += ["", f"- one-worker ratio (training phase): {_spread(one['ratio_stats'])}",
                f"- one-worker whole-epoch ratio: {_spread(one['epoch_ratio_stats'])}"]
    return out


def section_ingest(r: dict) -> list[str]:
    paired = r.get("paired", False)
    out = [f"Setting (digits, the headline ratio): {r['images']} PNG files, {r['cpus']} CPUs, " + (
        f"{r['repeats']} pairs of passes side by side (each: the DataLoader's pass in a fresh process with no Ray "
        "running, then a fresh embedded Ray's untimed warm-up and timed pass); each ratio is one pair's." if paired else
        f"{r['repeats']} timed passes of each (after one untimed warm-up pass each): the DataLoader's five, "
        "then Ray Data's five."), ""]
    out += table(["", "images/s"], [["rayfine (Ray Data)", _spread(r["rayfine_images_per_s"], 0)],
                                    ["torch DataLoader", _spread(r["dataloader_images_per_s"], 0)]])
    out += ["", f"- ratio: {_spread(r['ratio_stats'])}"]
    photos = r.get("photos")
    if photos:  # recorded from the photo folder too (bench/ingest.py since it has one)
        out += ["", f"Photos: {photos['images']} files ({photos['files']}) -> {photos['image_size']} px RGB, the same "
                "passes of both pipelines.", ""]
        out += table(["", "images/s"], [["rayfine (Ray Data)", _spread(photos["rayfine_images_per_s"], 0)],
                                        ["torch DataLoader", _spread(photos["dataloader_images_per_s"], 0)]])
        out += ["", f"- photos ratio: {_spread(photos['ratio_stats'])}"]
    phone = r.get("phone_photos")
    if phone:  # recorded since rayfine decodes large JPEGs at reduced scale
        out += ["", (f"Phone photos: {phone['images']} files ({phone['files']}) -> {phone['image_size']} px RGB, in one "
                     "process from bytes in memory, the three decoders' passes alternating."), ""]
        out += table(["", "images/s"], [["rayfine (`prepare_image`: reduced-scale JPEG decoding)", _spread(phone["rayfine_images_per_s"], 1)],
                                        ["the same steps decoding the file whole", _spread(phone["whole_decode_images_per_s"], 1)],
                                        ["PIL + torchvision Resize + CenterCrop", _spread(phone["torchvision_images_per_s"], 1)]])
        out += ["", f"- phone photos ratio (rayfine / torchvision's transforms): {_spread(phone['ratio_stats'], 2)}",
                (f"- rayfine / decoding whole: {_spread(phone['ratio_vs_whole_decode_stats'], 2)}; the resized pixels differ "
                 f"by at most {phone['max_level_difference_vs_whole_decode']} level(s) of 255")]
    return out


def section_serve(r: dict) -> list[str]:
    names = {"batched": "(a) Serve, batching", "unbatched": "(b) Serve, no batching", "plain": "(c) FastAPI + uvicorn"}
    rows = []
    for key, label in names.items():
        for c, m in r["servers"][key].items():
            rows.append([label, c[1:], _fmt(m["rps"]["median"], 1), f"[{_fmt(m['rps']['min'], 1)}, {_fmt(m['rps']['max'], 1)}]",
                         _fmt(m["p50_ms"], 1), _fmt(m["p99_ms"], 1), f"{m['errors']}/{m['requests']}",
                         _fmt(m.get("loadgen_cpu_ms_per_request", "not recorded"), 2)])
    out = [f"Setting: {r['model']['preset']} checkpoint; one PNG digit per request to /predict; {r['repeats']} runs per "
           f"cell, each at most {r['requests_per_run']} requests or {_fmt(r['run_cap_s'], 0)} s; latencies as the load "
           "generator sees them.", ""]
    out += table(["server", "concurrency", "req/s (median)", "req/s [min, max]", "p50 ms", "p99 ms", "errors/requests",
                  "load generator CPU ms/request"], rows)
    f = r["floor"]
    out += ["", f"- floor (in-process `run_batch`, 1 thread): one item p50 {_fmt(f['p50_ms'], 2)} ms, p99 "
            f"{_fmt(f['p99_ms'], 2)} ms ({_fmt(f['items_per_s'], 0)} items/s); batches of 16: "
            f"{_fmt(f['batch_16_items_per_s'], 0)} items/s; of 32: {_fmt(f['batch_32_items_per_s'], 0)} items/s",
            f"- batching_gain_c32: {_spread(r['batching_gain_c32_stats'], 2)}",
            f"- (a) / (c) at concurrency 32: {_fmt(r['batched_vs_plain_c32'], 2)}",
            f"- all servers and the floor gave the same labels for the 64 test digits: {_fmt(r['same_answers'])}",
            "- forward passes by batch size in the replicas: " + "; ".join(
                f"{k}: {v.get('batch_sizes')}" for k, v in r["batch_stats"].items()),
            "- requests and forward passes in the replicas (inference_count / execution_count): " + "; ".join(
                f"{k}: {v.get('inference_count')} / {v.get('execution_count')}" for k, v in r["batch_stats"].items())]
    return out


def section_end_to_end(r: dict) -> list[str]:
    rows = [[k.removesuffix("_s").replace("_", " "), _fmt(r[k], 1)]
            for k in ("ray_start_s", "search_s", "evaluation_s", "deploy_s", "cli_and_rest_s", "total_s")]
    s = r["search"]
    out = [f"Command: `{r['command']}` (one run). Search: {s['num_trials']} trials, {s['epochs_run']} of "
           f"{s['epochs_full_budget']} epochs ({_fmt(s['budget_fraction'], 2)} of the full budget), "
           f"{s['concurrent_trials']} at a time; winner's test accuracy {_fmt(r['test_accuracy'], 4)}.", ""]
    out += table(["stage", "seconds"], rows)
    out += ["", f"- first request to the served model: {_fmt(r['first_answer']['latency_ms'], 1)} ms; Ctrl-C to exit "
            f"{_fmt(r['stop_s'], 1)} s (exit code {r['exit_code']})"]
    return out


def section_memory(r: dict) -> list[str]:
    rows = []
    for key in ("digits", "rotten_tomatoes"):
        m = r.get(key)
        if not m:
            continue
        # Before the driver's own VmHWM was sampled, its figure was wait4's ru_maxrss (the driver's or a
        # reaped descendant's peak, whichever is larger).
        own = "driver_or_reaped_peak_rss_mib" in m
        rows.append([f"{m['preset']} ({', '.join(m['overrides'])})", _fmt(m["driver_peak_rss_mib"], 0) + ("" if own else " (ru_maxrss)"),
                     _fmt(m["driver_or_reaped_peak_rss_mib"], 0) if own else "-",
                     ", ".join(_fmt(x, 0) for x in m["workers_peak_rss_mib"]), _fmt(m["worker_peak_uss_mib"], 0),
                     _fmt(m["controller_peak_rss_mib"], 0), _fmt(m["wall_s"], 0)])
    out = table(["run", "driver peak RSS MiB (its VmHWM)", "driver or a reaped descendant (wait4 ru_maxrss) MiB",
                 "training workers peak RSS MiB", "worker peak USS MiB", "Train controller peak RSS MiB", "wall s"], rows)
    for key in ("digits", "rotten_tomatoes"):
        others = (r.get(key) or {}).get("largest_other_processes")
        if others:
            out += ["", f"- {key}, the largest other Ray processes (peak RSS MiB): " + ", ".join(
                f"{o['title']} {_fmt(o['peak_rss_mib'], 0)}" for o in others)]
    return out


def section_asha_curves(r: dict) -> list[str]:
    rows = [[str(p["seed"]), str(len(p["trials"])), str(max(len(t["epochs"]) for t in p["trials"])), str(p["test_rows"]),
             _fmt(p["fifo_best_test_accuracy"], 4)] for p in r["per_seed"]]
    return table(["seed", "configs", "epochs each", "test images", "FIFO winner test accuracy"], rows) + [
        "", "Every epoch's validation accuracy and loss, seconds and test accuracy are in results.json (asha_curves)."]


def section_asha_replay(r: dict) -> list[str]:
    s = r["setting"]
    out = [f"Setting: the asha setting ({s['configs_per_seed']} configs, max {s['max_epochs']} epochs, grace "
           f"{s['grace_period']}, reduction factor {s['reduction_factor']}), {s['slots']} trial slots, "
           f"{s['start_s']:.0f} s per trial start or resume.", ""]
    rows = []
    for p in r["per_seed"]:
        for rule in ("stopping", "promotion", "synchronous"):
            x = p[rule]
            rows.append([str(p["seed"]), rule, f"{x['epochs']}/{p['full']['epochs']}", _fmt(x["compute_ratio"]),
                         _fmt(x["worker_seconds_ratio"]), _fmt(x["best_test_accuracy"], 4),
                         _fmt(p["full"]["best_test_accuracy"], 4), f"{x['accuracy_gap']:+.4f}",
                         " ".join(map(str, x["stopped_after"]))])
    out += table(["seed", "rule", "epochs / full", "compute_ratio", "worker-s ratio", "winner test acc",
                  "full-budget winner test acc", "accuracy_gap", "epochs per trial"], rows)
    out += [""]
    for rule in ("stopping", "promotion", "synchronous"):
        out += [f"- {rule}: compute_ratio {_spread(r[f'{rule}_compute_ratio'])}; accuracy_gap "
                f"{_spread(r[f'{rule}_accuracy_gap'], 4)}"]
    out += ["- what validation cannot tell apart: " + "; ".join(
        f"seed {p['seed']}: {p['full']['near_best_epochs']} trial epochs within one validation image of the full-budget "
        f"winner score {_fmt(p['full']['near_best_test_min'], 4)}-{_fmt(p['full']['near_best_test_max'], 4)} on test"
        for p in r["per_seed"])]
    if r.get("sweep"):
        out += ["", "Sweep: every rule at other grace periods and reduction factors, the same curves (median over the "
                "seeds; per seed in brackets; goal: median compute_ratio <= 0.35 with median accuracy_gap <= 0.005).", ""]
        out += table(["rule", "grace", "reduction factor", "compute_ratio", "accuracy_gap", "goal met"], [
            [x["rule"], str(x["grace_period"]), str(x["reduction_factor"]),
             f"{_fmt(x['compute_ratio']['median'])} [{', '.join(_fmt(v) for v in x['compute_ratio']['values'])}]",
             f"{x['accuracy_gap']['median']:+.4f} [{', '.join(f'{v:+.4f}' for v in x['accuracy_gap']['values'])}]",
             "yes" if x["goal_met"] else "no"] for x in r["sweep"]])
    if r.get("pooled"):
        draws = r["pooled"][0]["draws"]
        out += ["", (f"More configurations per search: n configurations drawn {draws} times (each in its own order) from every "
                "seed's curves together (the seeds draw from the same search space and train on the same splits), at the "
                "setting's grace period and reduction factor; each draw against its own full budget (median [min, max] over "
                "the draws)."), ""]
        out += table(["configs", "rule", "compute_ratio", "accuracy_gap", "goal met"], [
            [str(x["configs"]), x["rule"],
             f"{_fmt(x['compute_ratio']['median'])} [{_fmt(x['compute_ratio']['min'])}, {_fmt(x['compute_ratio']['max'])}]",
             f"{x['accuracy_gap']['median']:+.4f} [{x['accuracy_gap']['min']:+.4f}, {x['accuracy_gap']['max']:+.4f}]",
             "yes" if x["goal_met"] else "no"] for x in r["pooled"]])
    return out


SECTIONS = {"asha": section_asha, "halving": section_halving, "halving_held_out": section_halving, "asha_replay": section_asha_replay, "asha_curves": section_asha_curves, "train_overhead": section_train_overhead, "ingest": section_ingest,
            "serve": section_serve, "end_to_end": section_end_to_end, "memory": section_memory}


def render(results: dict, notes_text: str | None = None) -> str:
    """RESULTS.md's text: the headline figures, then a section per results key. ``notes_text``: NOTES.md's."""
    what_bounds = bounds(NOTES.read_text() if notes_text is None else notes_text)
    m = results.get("machine", {})
    lines = ["# rayfine benchmarks", "",
             "Generated by `make bench` (`bench/run.py`, then `bench/report.py`) from `bench/results.json`. Each headline "
             "figure is a ratio of two things run side by side in the same script, repeated; the median is reported "
             "with its spread, because absolute times on a shared 2-CPU machine drift. (The halving rows, which the "
             "issue does not ask for, are the exception their label names: halving against an earlier FIFO "
             "record; halving_held_out runs its FIFO side in the same script.) What bounds each figure is written in "
             "[NOTES.md](NOTES.md), with the record behind it: every measurement, profile and change tried.", "",
             f"Machine: {common.measured_on(m, versions=False)} memory, {m.get('os')}; Python {m.get('python')}, Ray {m.get('ray')}, torch {m.get('torch')}. "
             f"Written {m.get('date')}. This is the machine of the latest script run; each section ends with the one "
             "it was measured on (NOTES.md lists the machines of earlier records: all had 2 CPUs, not all of one kind).",
             ""]
    quick = sorted(k for k, v in results.items() if isinstance(v, dict) and v.get("quick"))
    if quick:
        lines += [f"**Tiny (--quick) settings, not meaningful figures: {', '.join(quick)}.**", ""]
    lines += ["## Headline figures", ""]
    lines += table(["figure", "median", "[min, max]", "repeats", "goal", "met"], headline_rows(results))
    for key in ORDER:
        r = results.get(key)
        if not r:
            continue
        lines += ["", f"## {key}", "", f"Compared: {r.get('compared', '')}.", ""]
        try:
            lines += SECTIONS[key](r)
        except (KeyError, TypeError, IndexError):  # an older or partial record: show it as it is
            lines += ["```json", json.dumps(r, indent=1), "```"]
        if r.get("notes"):
            lines += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
        lines += ["", "What bounds it:", "", what_bounds.get(key, "(not written yet)"), "",
                  f"The record behind it: [NOTES.md, {key}](NOTES.md#{key})."]
        on = f" on {r['measured_on']}" if r.get("measured_on") else ""
        lines += ["", f"_measured {r.get('measured_at', '')}{on}_"]
    for key in sorted(k for k in results if k not in ORDER and k != "machine"):
        lines += ["", f"## {key}", "", "(written by another script; shown as recorded)", "", "```json",
                  json.dumps(results[key], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Render a bench results file as Markdown.")
    p.add_argument("results", nargs="?", type=Path, default=common.RESULTS, help="default: bench/results.json")
    p.add_argument("out", nargs="?", type=Path, help="default: RESULTS.md beside bench/results.json, else <results>.md")
    args = p.parse_args(argv)
    src = args.results
    dst = args.out or src.with_name("RESULTS.md" if src.resolve() == common.RESULTS.resolve() else src.stem + ".md")
    dst.write_text(render(common.read_results(src)))
    print(f"[bench] {dst}")


if __name__ == "__main__":
    main(sys.argv[1:])
