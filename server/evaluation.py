"""What every ServerApp does besides aggregating: evaluate the global model on the official test
split each round, record it, and at the end export the merged model and write the summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import MetricRecord

from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, TaskInfo, load_split, task_info
from fedmeld.task.engine import evaluate, pick_device
from fedmeld.task.wire import nbytes
from fedmeld.server.report import RunRecorder, default_run_name, make_run_dir


@dataclass
class CentralEvaluation:
    cfg: RunConfig
    recorder: RunRecorder
    info: TaskInfo
    device: torch.device
    test: Split
    train_labels: torch.Tensor

    @classmethod
    def start(cls, cfg: RunConfig) -> CentralEvaluation:
        """A new run directory and the splits the server evaluates on."""
        recorder = RunRecorder(make_run_dir(cfg.out, cfg.run_name or default_run_name(cfg)))
        train = load_split(cfg.dataset, "train", cfg.image_size, cfg.data_root)
        return cls(cfg, recorder, task_info(cfg.dataset), pick_device(cfg.device),
                   load_split(cfg.dataset, "test", cfg.image_size, cfg.data_root), train.labels)

    def __call__(self, model: torch.nn.Module, server_round: int, round_stats: dict[str, float]) -> MetricRecord:
        """Test metrics of ``model`` as it stands after ``server_round`` (0: before training), recorded."""
        result = evaluate(model, self.test, self.info, device=self.device, input_size=self.cfg.input_size)
        metrics = {"test_loss": result.loss, "test_accuracy": result.accuracy, "test_auc": result.auc}
        self.recorder.log_evaluation(server_round, metrics, round_stats, self.cfg.num_server_rounds)
        return MetricRecord(metrics)

    def finish(self, model: torch.nn.Module, plain_state: dict[str, torch.Tensor],
               global_state: dict[str, torch.Tensor]) -> Path:
        """Export ``plain_state`` (loads into plain timm) and write summary.json, with the sizes every
        protocol reports; return the run directory."""
        export = self.recorder.export_model(plain_state, {
            "timm_model": self.cfg.model, "num_classes": str(self.info.num_classes),
            "in_chans": str(self.info.in_chans), "image_size": str(self.cfg.model_size)})
        rounds = self.recorder.rounds
        self.recorder.finish(
            self.cfg, model, self.test.labels, self.train_labels, export,
            global_state_bytes=nbytes(global_state), full_model_bytes=nbytes(plain_state),
            bytes_per_client_round=sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
            / max(sum(r["num_clients_ok"] for r in rounds), 1),
            samples_seen=sum(r["samples_seen"] for r in rounds))
        return self.recorder.run_dir
