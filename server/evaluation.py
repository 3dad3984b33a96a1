"""What every ServerApp does besides aggregating: evaluate the global model on the official
validation and test splits each round, record them, keep the round the validation metric selects,
and at the end export the merged models and write the summary.

Selection follows MedMNIST v2's protocol: the reported model is the one with the best
``select-metric`` on the dataset's official ``val`` split; its test metrics are reported beside
the last round's. Picking the best *test* round would overstate the result, so the test split never
chooses anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import MetricRecord

from fedmeld.server.checkpoint import Checkpoint
from fedmeld.server.report import RunRecorder, default_run_name, make_run_dir, select_round
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, TaskInfo, load_split, task_info
from fedmeld.task.engine import Inputs, evaluate, pick_device
from fedmeld.task.export import write_hf_peft, write_timm_config
from fedmeld.task.schedule import lr_at
from fedmeld.task.wire import State, nbytes, snapshot

log = logging.getLogger(__name__)


@dataclass
class CentralEvaluation:
    cfg: RunConfig
    recorder: RunRecorder
    info: TaskInfo
    device: torch.device
    val: Split
    test: Split
    train_labels: torch.Tensor
    selected: State = field(default_factory=dict)  # the global state of the selected round so far

    @classmethod
    def start(cls, cfg: RunConfig, checkpoint: Checkpoint | None = None) -> CentralEvaluation:
        """A new run directory (or, resuming, the checkpoint's, with its rounds so far) and the splits
        the server evaluates on."""
        if checkpoint is None:
            recorder = RunRecorder(make_run_dir(cfg.out, cfg.run_name or default_run_name(cfg)))
        else:
            recorder = RunRecorder(Path(cfg.resume).expanduser().resolve())
            recorder.resume(checkpoint.round, checkpoint.initial)
        split = {s: load_split(cfg.dataset, s, cfg.image_size, cfg.data_root) for s in ("train", "val", "test")}
        return cls(cfg, recorder, task_info(cfg.dataset), pick_device(cfg.device), split["val"], split["test"],
                   split["train"].labels, checkpoint.parts["selected"] if checkpoint else {})

    def __call__(self, model: torch.nn.Module, server_round: int, round_stats: dict,
                 global_state: State) -> MetricRecord:
        """Validation and test metrics of ``model`` as it stands after ``server_round`` (0: before
        training), recorded; ``global_state`` (what produced ``model``) is kept when the validation
        metric selects this round (it goes into the round's checkpoint, and is written as
        ``selected.safetensors`` at the end)."""
        metrics = {}
        for name, split in (("val", self.val), ("test", self.test)):
            result = evaluate(model, split, self.info, device=self.device, inputs=Inputs.of(self.cfg),
                              precision=self.cfg.precision)
            metrics |= {f"{name}_loss": result.loss, f"{name}_accuracy": result.accuracy, f"{name}_auc": result.auc}
        extra = {"lr": lr_at(self.cfg, server_round)} if server_round else {}
        self.recorder.log_evaluation(server_round, metrics, {**round_stats, **extra}, self.cfg.num_server_rounds)
        if server_round and select_round(self.recorder.rounds, self.cfg.select_metric)["round"] == server_round:
            self.selected = snapshot(global_state)
        return MetricRecord(metrics)

    def finish(self, model: torch.nn.Module, load_into: Callable[[torch.nn.Module, State], None],
               plain_state: State, global_state: State, selected_plain_state: State | None = None) -> Path:
        """Save the last round's ``global_state`` (adapter.safetensors) and the selected round's;
        export ``plain_state`` (the last round; loads into plain timm) and the selected round's, with
        timm's config.json beside them, and both rounds' adapters for Hugging Face peft (``load_into``:
        the protocol's, which makes ``model`` compute a global state); write summary.json with the sizes every protocol reports;
        return the run directory."""
        rounds = self.recorder.rounds
        self.recorder.save_state(global_state, rounds[-1]["round"] if rounds else 0)
        if self.selected:
            self.recorder.save_state(self.selected, select_round(rounds, self.cfg.select_metric)["round"],
                                     name="selected.safetensors")
        metadata = {"timm_model": self.cfg.model, "num_classes": str(self.info.num_classes),
                    "in_chans": str(self.info.in_chans), "image_size": str(self.cfg.model_size)}
        export = self.recorder.export_model(plain_state, metadata)
        if selected_plain_state is not None:
            self.recorder.export_model(selected_plain_state, metadata, name="model_selected.safetensors")
        timm_config = write_timm_config(self.recorder.run_dir, self.cfg, self.info, plain_state)
        hf_peft = self._export_hf_peft(model, load_into, global_state)
        self.recorder.finish(
            self.cfg, model, self.test.labels, self.train_labels, export,
            global_state_bytes=nbytes(global_state), full_model_bytes=nbytes(plain_state),
            bytes_per_client_round=sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
            / max(sum(r["num_clients_ok"] for r in rounds), 1),
            samples_seen=sum(r["samples_seen"] for r in rounds),
            exports={"timm_config": timm_config and timm_config.name, "hf_peft": hf_peft})
        return self.recorder.run_dir

    def _export_hf_peft(self, model: torch.nn.Module, load_into: Callable[[torch.nn.Module, State], None],
                        global_state: State) -> list[str] | str:
        """hf_peft/ (the last round) and hf_peft_selected/ (the selected round, always, as
        model_selected.safetensors, so a script need not know whether it is the last); the directories
        written, or why none was (logged too: the run goes on)."""
        rounds = self.recorder.rounds
        states = {"hf_peft": (rounds[-1]["round"] if rounds else 0, global_state)}
        if self.selected:
            states["hf_peft_selected"] = (select_round(rounds, self.cfg.select_metric)["round"], self.selected)
        for name, (server_round, state) in states.items():
            load_into(model, state)
            reason = write_hf_peft(model, self.cfg, self.recorder.run_dir / name, server_round)
            if reason:
                log.info("no Hugging Face peft export: %s; model_merged.safetensors holds the whole model", reason)
                return f"not written: {reason}"
        return list(states)
