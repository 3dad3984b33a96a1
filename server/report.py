"""What a run leaves on disk: per-round metrics, checkpoints, a summary, a plot and the merged model.

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written checkpoint or summary behind.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedmeld.task.config import RunConfig

ROUND_KEYS = ("round", "val_accuracy", "val_auc", "val_loss", "test_accuracy", "test_auc", "test_loss", "lr",
              "train_loss", "num_clients_ok", "num_clients_failed", "bytes_up", "bytes_down", "round_seconds")


def select_round(rounds: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The round the official validation split selects: the best ``metric`` (lowest for a loss),
    the earliest of equals; a NaN never wins."""
    sign = -1.0 if metric.endswith("loss") else 1.0

    def score(record: dict[str, Any]) -> float:
        value = float(record[metric])
        return -math.inf if math.isnan(value) else sign * value

    return max(rounds, key=lambda r: (score(r), -r["round"]))


def default_run_name(cfg: RunConfig) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.dataset}-{cfg.peft.replace('+', '-')}"


LOG_FILE = "flower.log"  # Flower's and Ray's log lines of a run (fedmeld run without --verbose)


def run_dir_path(out: str, run_name: str) -> Path:
    """Where a run writes; a directory that holds anything but the run's own log is refused, never
    overwritten."""
    path = Path(out).expanduser().resolve() / run_name
    if path.exists() and any(p.name != LOG_FILE for p in path.iterdir()):
        raise FileExistsError(f"run directory {path} already holds files; choose another run-name=NAME or "
                              f"out=DIR, or, if it was interrupted, continue it with fedmeld run --resume {path}")
    return path


def make_run_dir(out: str, run_name: str) -> Path:
    path = run_dir_path(out, run_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": version("timm"),
            "flwr": version("flwr"), "medmnist": version("medmnist")}


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunRecorder:
    """Appends one JSON line per round and writes the run's files (states, exports, summary, plot)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}  # the global model's test metrics before round 1
        self.started = time.perf_counter()

    def resume(self, server_round: int, initial: dict[str, float]) -> None:
        """Continue a run after ``server_round``: its rounds so far from metrics.jsonl (rows a killed
        run wrote past its checkpoint are dropped, the file rewritten atomically)."""
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        self.rounds = [r for r in rows if r["round"] <= server_round]
        if [r["round"] for r in self.rounds] != list(range(1, server_round + 1)):
            raise ValueError(f"{path} does not hold rounds 1..{server_round} of the checkpoint")
        atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.rounds)))
        self.initial = dict(initial)

    def log_evaluation(self, server_round: int, metrics: dict[str, float], stats: dict[str, float],
                       num_rounds: int) -> None:
        """The server's test metrics for a round plus the strategy's round stats (round 0: the start)."""
        if server_round == 0:
            self.initial = dict(metrics)
            return
        stats = dict(stats)
        stats["round_seconds"] = time.perf_counter() - stats.pop("round_start")
        self.log_round({"round": server_round, **metrics, **stats}, num_rounds)

    def log_round(self, record: dict[str, Any], num_rounds: int) -> None:
        self.rounds.append(record)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[fedmeld] round {record['round']}/{num_rounds}: clients {record['num_clients_ok']} ok"
              f" / {record['num_clients_failed']} failed | train loss {record['train_loss']:.4f}"
              f" | val auc {record['val_auc']:.4f} | test acc {record['test_accuracy']:.4f} auc {record['test_auc']:.4f}"
              f" | up {record['bytes_up'] / 1e6:.2f} MB down {record['bytes_down'] / 1e6:.2f} MB"
              f" | {record['round_seconds']:.1f} s", flush=True)

    def save_state(self, state: dict[str, torch.Tensor], server_round: int, name: str = "adapter.safetensors") -> None:
        """A global state (of ``server_round``) as safetensors."""
        tensors = {k: v.contiguous() for k, v in state.items()}
        atomic_write(self.run_dir / name, lambda p: save_file(tensors, str(p), metadata={"round": str(server_round)}))

    def export_model(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
                     name: str = "model_merged.safetensors") -> Path:
        """The merged model as safetensors that `timm.create_model(...).load_state_dict` takes."""
        path = self.run_dir / name
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))
        return path

    def finish(self, cfg: RunConfig, model: torch.nn.Module, test_labels: torch.Tensor,
               train_labels: torch.Tensor, export: Path, **extra: Any) -> None:
        """summary.json (the fields every run has, plus ``extra``), the plot, and the run's summary
        on the console."""
        from fedmeld.peft import count_parameters

        majority = int(train_labels[:, 0].mode().values)
        trainable, total = count_parameters(model)
        last = self.rounds[-1] if self.rounds else {}
        selected = select_round(self.rounds, cfg.select_metric) if self.rounds else {}
        took_part = sorted({p for r in self.rounds for p in r.get("partitions_ok", [])})
        privacy = {k: last[k] for k in ("dp_epsilon", "dp_delta") if k in last}
        summary = {
            "final_test_accuracy": last.get("test_accuracy"), "final_test_auc": last.get("test_auc"),
            "select_metric": cfg.select_metric, "selected_round": selected.get("round"),
            f"selected_{cfg.select_metric}": selected.get(cfg.select_metric),
            "selected_test_accuracy": selected.get("test_accuracy"), "selected_test_auc": selected.get("test_auc"),
            "initial_test_accuracy": self.initial.get("test_accuracy"),
            "initial_test_auc": self.initial.get("test_auc"), "initial": self.initial,
            "majority_class_accuracy": float((test_labels[:, 0] == majority).float().mean()),
            # what ran, not what was asked for: the partitions whose replies were aggregated
            "num_clients_took_part": len(took_part), "partitions_took_part": took_part,
            "num_rounds": len(self.rounds), "trainable_params": trainable, "total_params": total,
            "bytes_up_total": sum(r["bytes_up"] for r in self.rounds),
            "bytes_down_total": sum(r["bytes_down"] for r in self.rounds), **privacy,
            **extra, "merged_model": export.name, "hardware": hardware(), "versions": versions(),
            "date": datetime.now().isoformat(timespec="seconds"), "config": cfg.to_flower(),
        }
        self.write_summary(summary)
        print(console_summary({**summary, "wall_seconds": time.perf_counter() - self.started}, self.run_dir),
              flush=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        summary = {**summary, "wall_seconds": time.perf_counter() - self.started}
        atomic_write(self.run_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
        plot_curves(self.rounds, summary, self.run_dir / "curves.png")


def console_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """The end of a run in a few lines: last and selected test metrics, bytes, time, where it is."""
    lines = [f"[fedmeld] finished {summary['num_rounds']} rounds in {summary['wall_seconds']:.0f} s with "
             f"{summary['num_clients_took_part']} of {summary['config']['num-clients']} clients taking part | "
             f"{summary['bytes_up_total'] / 1e6:.2f} MB up, {summary['bytes_down_total'] / 1e6:.2f} MB down"]
    if summary["num_rounds"]:
        lines.append(f"[fedmeld] test ACC {summary['final_test_accuracy']:.4f} AUC {summary['final_test_auc']:.4f} "
                     f"(last round) | {summary['selected_test_accuracy']:.4f} / {summary['selected_test_auc']:.4f} "
                     f"(round {summary['selected_round']}, selected by {summary['select_metric']}) | majority "
                     f"class {summary['majority_class_accuracy']:.4f}")
    if "dp_epsilon" in summary:
        lines.append(f"[fedmeld] privacy spent: epsilon {summary['dp_epsilon']:.3f} at delta {summary['dp_delta']:g}")
    lines.append(f"[fedmeld] run directory: {run_dir}")
    return "\n".join(lines)


def run_title(config: dict[str, Any]) -> str:
    """Dataset, model, adapter, aggregation and clients of a run, for plot titles and tables."""
    return (f"{config['dataset']} · {config['model']} · {config['peft']} · {config['aggregation']} · "
            f"{config['num-clients']} clients")


def curve_points(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds' records preceded by round 0, the global model before training."""
    initial = summary.get("initial") or {k.removeprefix("initial_"): summary[k]  # runs that kept only these
                                         for k in ("initial_test_accuracy", "initial_test_auc") if k in summary}
    return ([{"round": 0, **initial}] if initial else []) + list(rounds)


def plot_curves(rounds: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Validation and test ACC/AUC per round from round 0 (before training), the majority-class
    rate (the score of predicting the commonest class: learning must beat it), the selected round,
    and the mean client train loss; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(rounds, summary)
    x = [r["round"] for r in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for split, style in (("val", "--"), ("test", "-")):
        for metric, marker, color in (("accuracy", "o", "tab:blue"), ("auc", "s", "tab:orange")):
            ax1.plot(x, [r.get(f"{split}_{metric}", math.nan) for r in points], f"{marker}{style}", ms=3,
                     color=color, label=f"{split} {'ACC' if metric == 'accuracy' else 'AUC'}")
    ax1.axhline(summary["majority_class_accuracy"], color="black", lw=0.8, ls="-.",
                label=f"majority-class ACC ({summary['majority_class_accuracy']:.3f})")
    if summary.get("selected_round"):
        ax1.axvline(summary["selected_round"], color="gray", ls=":",
                    label=f"selected by {summary['select_metric']} (round {summary['selected_round']})")
    ax1.set(xlabel="round (0: before training)", ylabel="score", title="Global model, official val and test splits")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], "o-", color="tab:red")
    ax2.set(xlabel="round", ylabel="loss", title="Mean client train loss")
    ax2.grid(alpha=0.3)
    fig.suptitle(run_title(summary["config"]), fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
