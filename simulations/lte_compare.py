"""From-scratch comparison: full training vs single LoRA vs LTE vs federated LTE, at equal samples seen.

``fedmeld lte-compare [--small | --full] [--out DIR] [--set key=value ...]``

Four runs of the project's own run machinery (``simulations.run.load_config`` + ``simulate`` with
the in-process Flower backend, so no Ray), all from random init (``pretrained=false``), on the same
MedMNIST file, the same model, seed, rounds and local epochs:

- ``full``:     ``peft=full``, ``num-clients=1`` (centralized: one client holding the whole train split)
- ``lora``:     ``peft=lora+norm+bitfit`` on every Linear/Conv2d LTE wraps, ``num-clients=1``; the random
                backbone stays frozen (a single LoRA, never merged)
- ``lte``:      ``peft=lte``, H heads, merge every T optimizer steps, ``num-clients=1``
- ``fed-lte``:  ``peft=lte``, 4 clients, Dirichlet(0.5) label skew, only low-rank factors travel

Every round each run passes once (``local-epochs`` times) over the same training data (the whole
train split minus ``val-fraction`` centrally, the union of the clients' shards federated), so the
test accuracy logged per round (``metrics.jsonl``) is taken at equal numbers of samples seen.
Run directories go to a temporary folder (kept with ``--keep-runs DIR``); ``--out`` receives three
small files: ``lte_compare.md`` (table), ``lte_compare.json`` (everything in it, plus per-round
curves) and ``lte_compare.png`` (test accuracy against samples seen).

Bytes per round are per client and round, upload plus download, as the federation counted them
(in-process messages, ArrayRecord payload bytes); ``full_model_bytes`` is the size of the whole
model's weights for comparison. Centralized runs count their one client's traffic, i.e. what that
method would send per client in a federation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmeld.task.config import ConfigError, RunConfig, parse_pairs
from fedmeld.simulations.run import load_config, simulate

METHODS = ("full", "lora", "lte", "fed-lte")
LORA_TARGETS = "patch_embed.proj,attn.qkv,attn.proj,mlp.fc1,mlp.fc2"  # what LTE wraps in a timm ViT
JSON_KEYS = ("date", "hardware", "versions", "preset", "dataset", "majority_class_accuracy", "methods",
             "lte_vs_full_gap_points", "fed_lte_vs_full_gap_points", "fed_lte_bytes_ratio_vs_full",
             "lte_beats_majority_and_first_eval")
METHOD_KEYS = ("method", "overrides", "final_test_accuracy", "final_test_auc", "best_test_accuracy",
               "initial_test_accuracy", "trainable_params", "total_params", "bytes_per_client_round",
               "full_model_bytes", "samples_seen", "wall_seconds", "curve")

# Presets: run-config keys shared by all methods, then per-method keys. Tuned by hand; what was
# tried is in simulations/results/lte_compare_cpu/NOTES.md.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {  # 2-core CPU, <= 3 minutes for all four runs
        "common": {"dataset": "pneumoniamnist", "model": "vit_pico_patch4_28", "num-server-rounds": 3,
                   "local-epochs": 1, "batch-size": 64, "lora-rank": 4, "device": "cpu"},
        "full": {"lr": 0.002},
        "lora": {"lr": 0.005, "lora-alpha": 8.0},
        "lte": {"lr": 0.005, "lte-heads": 4, "lte-merge-every": 1, "lora-alpha": 8.0},
        "fed-lte": {"lr": 0.0005, "lte-heads": 4, "lte-merge-every": 1, "lora-alpha": 8.0},  # skewed clients drift
    },
    "full": {  # one H100, <= 4 minutes for all four runs
        "common": {"dataset": "pneumoniamnist", "model": "vit_nano_patch4_28", "num-server-rounds": 15,
                   "local-epochs": 1, "batch-size": 64, "lora-rank": 8, "device": "auto"},
        "full": {"lr": 0.001},
        "lora": {"lr": 0.003, "lora-alpha": 16.0},
        "lte": {"lr": 0.003, "lte-heads": 8, "lte-merge-every": 1, "lora-alpha": 16.0},
        "fed-lte": {"lr": 0.001, "lte-heads": 1, "lte-merge-every": 1, "lora-alpha": 16.0, "lora-rank": 6},
    },
}
FIXED = {  # what makes each method what it is; --set cannot change these
    "full": {"peft": "full", "num-clients": 1, "partition": "iid", "pretrained": False},
    "lora": {"peft": "lora+norm+bitfit", "num-clients": 1, "partition": "iid", "pretrained": False,
             "target-modules": LORA_TARGETS},
    "lte": {"peft": "lte", "num-clients": 1, "partition": "iid", "pretrained": False},
    "fed-lte": {"peft": "lte", "num-clients": 4, "min-clients": 4, "partition": "dirichlet",
                "dirichlet-alpha": 0.5, "pretrained": False},
}


def method_overrides(preset: str, method: str, common_set: dict[str, Any],
                     method_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Preset common keys < preset method keys < --set < --set-METHOD < the method's fixed keys."""
    p = PRESETS[preset]
    return {**p["common"], **p[method], **common_set, **method_set.get(method, {}), **FIXED[method]}


def run_method(method: str, overrides: dict[str, Any], runs_root: Path, tag: str) -> dict[str, Any]:
    pairs = {**overrides, "out": str(runs_root), "run-name": f"{tag}-{method}"}
    cfg = load_config(None, [])  # defaults, then ours (load_config resolves out and run-name)
    cfg = RunConfig.from_mapping({**cfg.to_flower(), **pairs})
    started = time.perf_counter()
    run_dir = simulate(cfg, backend="inprocess")
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, seen = [], 0
    if summary.get("initial_test_accuracy") is not None:
        curve.append({"round": 0, "samples_seen": 0, "test_accuracy": summary["initial_test_accuracy"],
                      "test_auc": summary.get("initial_test_auc")})
    for r in rounds:
        seen += int(r["samples_seen"])  # what the clients trained on this round, every protocol records it
        curve.append({"round": r["round"], "samples_seen": seen, "test_accuracy": r["test_accuracy"],
                      "test_auc": r["test_auc"]})
    clients_rounds = max(sum(int(r.get("num_clients_ok", 0)) for r in rounds), 1)
    bytes_round = summary.get("bytes_per_client_round")
    if bytes_round is None:
        bytes_round = (summary["bytes_up_total"] + summary["bytes_down_total"]) / clients_rounds
    return {
        "method": method, "overrides": overrides, "run_dir": str(run_dir),
        "final_test_accuracy": summary["final_test_accuracy"], "final_test_auc": summary["final_test_auc"],
        "best_test_accuracy": max((c["test_accuracy"] for c in curve[1:]), default=None),
        "initial_test_accuracy": summary.get("initial_test_accuracy"),
        "majority_class_accuracy": summary["majority_class_accuracy"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "bytes_per_client_round": bytes_round,
        "full_model_bytes": summary.get("full_model_bytes", 4 * summary["total_params"]),
        "samples_seen": seen, "wall_seconds": wall, "curve": curve,
        "hardware": summary.get("hardware"), "versions": summary.get("versions"),
    }


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    json_path = out / "lte_compare.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")

    full_bytes = methods["full"]["bytes_per_client_round"] if "full" in methods else None
    lines = [
        f"# LTE from scratch vs full training vs LoRA ({results['dataset']}, preset `{results['preset']}`)",
        "",
        f"Date: {results['date']}. Hardware: {results['hardware']}. "
        f"torch {results['versions'].get('torch', '?')}, timm {results['versions'].get('timm', '?')}, "
        f"flwr {results['versions'].get('flwr', '?')}.",
        f"Test majority-class rate: {results['majority_class_accuracy']:.4f}. All runs from random init "
        f"(`pretrained=false`), same seed, same samples seen per round.",
        "",
        "| method | peft | clients | heads x rank / merge every | final test ACC | final test AUC | best ACC | "
        "first eval ACC | trainable params | bytes / client / round | vs full | full model | samples seen | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in methods.items():
        o = m["overrides"]
        shape = (f"{o.get('lte-heads')} x {o.get('lora-rank')} / {o.get('lte-merge-every')}" if o["peft"] == "lte"
                 else f"1 x {o.get('lora-rank')} / never" if o["peft"].startswith("lora") else "-")
        ratio = f"{m['bytes_per_client_round'] / full_bytes:.3f}" if full_bytes else "-"
        first = m["initial_test_accuracy"]
        lines.append(
            f"| {name} | {o['peft']} | {o['num-clients']} | {shape} | {m['final_test_accuracy']:.4f} | "
            f"{m['final_test_auc']:.4f} | {m['best_test_accuracy']:.4f} | "
            f"{'-' if first is None else f'{first:.4f}'} | {m['trainable_params']:,} | "
            f"{_fmt_bytes(m['bytes_per_client_round'])} | {ratio} | {_fmt_bytes(m['full_model_bytes'])} | "
            f"{m['samples_seen']:,} | {m['wall_seconds']:.1f} |")
    lines += ["", "Summary:", ""]
    for key, label in (("lte_vs_full_gap_points", "LTE minus full, final test ACC (points)"),
                       ("fed_lte_vs_full_gap_points", "federated LTE minus full, final test ACC (points)"),
                       ("fed_lte_bytes_ratio_vs_full", "federated LTE bytes per client-round / full training's"),
                       ("lte_beats_majority_and_first_eval", "LTE beats the majority rate and its first eval")):
        if results.get(key) is not None:
            v = results[key]
            lines.append(f"- {label}: {v:+.2f}" if isinstance(v, float) and "points" in label
                         else f"- {label}: {v:.4f}" if isinstance(v, float) else f"- {label}: {v}")
    lines += ["", "Settings (run-config overrides per method):", ""]
    lines += [f"- `{n}`: " + " ".join(f"{k}={v}" for k, v in m["overrides"].items()) for n, m in methods.items()]
    lines += ["", "Bytes: upload + download per client and round (ArrayRecord payloads); centralized runs "
              "count their single client. The LoRA baseline trains no pos_embed/cls_token (LTE trains them as "
              "replicas). Real MedMNIST images; see the data folder's SOURCES.md for how the file differs "
              "from the official release: these are not official MedMNIST results.", ""]
    md_path = out / "lte_compare.md"
    md_path.write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in methods.items():
        ax.plot([c["samples_seen"] for c in m["curve"]], [c["test_accuracy"] for c in m["curve"]], "o-", label=name)
    ax.axhline(results["majority_class_accuracy"], color="grey", ls="--", label="majority class")
    ax.set(xlabel="training samples seen", ylabel="test accuracy",
           title=f"From scratch on {results['dataset']} ({results['preset']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = out / "lte_compare.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [md_path, json_path, png_path]


def compare(preset: str, out: Path, methods: list[str], common_set: dict[str, Any],
            method_set: dict[str, dict[str, Any]], keep_runs: Path | None = None) -> dict[str, Any]:
    plan = {m: method_overrides(preset, m, common_set, method_set) for m in methods}
    for m, o in plan.items():  # refuse bad settings before anything trains
        RunConfig.from_mapping(o)
    tag = datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="lte_compare-") as tmp:
        runs_root = keep_runs or Path(tmp)
        results: dict[str, Any] = {"methods": {}}
        for i, (m, o) in enumerate(plan.items(), 1):
            print(f"[lte_compare] {i}/{len(plan)} {m}: " + " ".join(f"{k}={v}" for k, v in o.items()), flush=True)
            r = run_method(m, o, runs_root, tag)
            print(f"[lte_compare] {m}: test ACC {r['final_test_accuracy']:.4f} AUC {r['final_test_auc']:.4f}"
                  f" (first eval {r['initial_test_accuracy'] or math.nan:.4f}) | {r['trainable_params']:,} trainable"
                  f" | {_fmt_bytes(r['bytes_per_client_round'])}/client/round | {r['wall_seconds']:.1f} s", flush=True)
            results["methods"][m] = r
    first = next(iter(results["methods"].values()))
    ms = results["methods"]
    results.update({
        "date": datetime.now().isoformat(timespec="seconds"), "hardware": first.pop("hardware"),
        "versions": first.pop("versions"), "preset": preset, "dataset": first["overrides"]["dataset"],
        "majority_class_accuracy": first["majority_class_accuracy"],
        "lte_vs_full_gap_points": _gap(ms, "lte"), "fed_lte_vs_full_gap_points": _gap(ms, "fed-lte"),
        "fed_lte_bytes_ratio_vs_full": (ms["fed-lte"]["bytes_per_client_round"] / ms["full"]["bytes_per_client_round"]
                                        if {"fed-lte", "full"} <= ms.keys() else None),
        "lte_beats_majority_and_first_eval": (
            ms["lte"]["final_test_accuracy"] > max(ms["lte"]["majority_class_accuracy"],
                                                   ms["lte"]["initial_test_accuracy"]) if "lte" in ms else None),
    })
    for r in ms.values():
        r.pop("hardware", None), r.pop("versions", None)
        if keep_runs is None:
            r.pop("run_dir", None)
    for path in write_outputs(results, out):
        print(f"[lte_compare] wrote {path}", flush=True)
    return results


def _gap(ms: dict[str, Any], method: str) -> float | None:
    if {method, "full"} <= ms.keys():
        return 100 * (ms[method]["final_test_accuracy"] - ms["full"]["final_test_accuracy"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmeld lte-compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="preset", action="store_const", const="small",
                      help="CPU preset (default): vit_pico_patch4_28 on PneumoniaMNIST, 3 rounds; <= 3 min on 2 cores")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="GPU preset: vit_nano_patch4_28 (width 192), 15 rounds; <= 4 min on one H100")
    parser.set_defaults(preset="small")
    parser.add_argument("--out", default="simulations/results/lte_compare_cpu", type=Path,
                        help="folder for lte_compare.md, .json and .png (created; default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding <dataset>.npz (the run-config key data-root); default: $MEDMNIST_ROOT, "
                             "else /work/shared/data/medmnist-subsets when it exists")
    parser.add_argument("--set", dest="common_set", action="append", default=[], metavar="key=value",
                        help="run-config override for every method, e.g. --set num-server-rounds=1 (repeatable); "
                             "the keys that define a method (peft, num-clients, partition, ...) cannot be changed")
    for m in METHODS:
        parser.add_argument(f"--set-{m}", dest=f"set_{m.replace('-', '_')}", action="append", default=[],
                            metavar="key=value", help=f"run-config override for {m} only (repeatable)")
    parser.add_argument("--keep-runs", type=Path, default=None,
                        help="keep the four run directories under this folder (default: a temporary folder, deleted)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --small, since a shared 2-core CPU thrashes with "
                             "more; torch's default with --full)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods must be a subset of {', '.join(METHODS)}")
    try:
        common = parse_pairs(args.common_set)
        per_method = {m: parse_pairs(getattr(args, f"set_{m.replace('-', '_')}")) for m in METHODS}
    except ConfigError as err:
        parser.error(str(err))
    data_root = args.data_root or os.environ.get("MEDMNIST_ROOT") or (
        "/work/shared/data/medmnist-subsets" if Path("/work/shared/data/medmnist-subsets").is_dir() else "")
    if data_root and "data-root" not in common:
        common["data-root"] = data_root
    threads = args.threads if args.threads is not None else (1 if args.preset == "small" else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import flwr.common.logger  # noqa: F401 -- Flower sets its logger's level on import; quiet it after that

    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False
    try:
        compare(args.preset, args.out, methods, common, per_method, args.keep_runs)
    except ConfigError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
