"""The backbone-merge protocol on the server (LTE, exact LoRA aggregation): per-node broadcasts
with catch-up, replies merged into the global backbone by ``task.backbone_merge.BackboneMergeServer``
(whose docstring describes the protocol), and every client's backbone fingerprint compared with
the server's at each evaluation."""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Message
from torch import nn

from fedmeld.server.optimizers import ServerOptimizer
from fedmeld.server.strategy import Protocol, Reply, State
from fedmeld.task.backbone_merge import (VERSION_KEY, Backbone, BackboneMergeServer, ServerStep, base_state,
                                         build_merge_model, checksum, dense_rule, dense_state, global_base, global_dense,
                                         global_velocity, load)
from fedmeld.task.config import RunConfig
from fedmeld.task.data import TaskInfo


class BackboneMergeProtocol(Protocol):
    required_metrics = (VERSION_KEY,)

    def __init__(self, server: BackboneMergeServer, dense_opt: ServerOptimizer | None = None) -> None:
        self.server = server
        self.dense_opt = dense_opt or ServerOptimizer()  # the dense tensors' server step (its moments checkpointed)
        self.node_versions: dict[int, int] = {}  # what each node last reported: its catch-up starts there
        self._diffs: list[float] = []  # this round's replica checks from the train replies
        self._expected = {k: (shape, server.reply_dtypes()[k]) for k, shape in server.reply_shapes().items()}

    @classmethod
    def for_run(cls, cfg: RunConfig, model: nn.Module) -> BackboneMergeProtocol:
        dense_opt = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_beta1)
        return cls(BackboneMergeServer(base_state(model), dense_state(model), dense_rule(cfg), ServerStep.of(cfg)),
                   dense_opt)

    @staticmethod
    def build_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
        """The server's model: the clients' (under client-ranks, at the largest rank)."""
        return build_merge_model(cfg.for_client(None), info)

    def payload(self, node_id: int) -> tuple[State, dict[str, ConfigRecord], int]:
        state, catchup = self.server.payload(self.node_versions.get(node_id, 0))
        return state, {"backbone": ConfigRecord({"version": self.server.version})}, catchup

    def expected(self) -> dict[str, tuple[tuple[int | None, ...], torch.dtype]]:
        return self._expected

    def prepare(self, state: State) -> State:
        """Each layer's factors must agree on their rank (B is out × r, A is r × in)."""
        for name, b in state.items():
            if name.startswith("factor/") and name.endswith("/B"):
                a = state.get(name[:-1] + "A")
                if a is not None and (b.dim() < 2 or a.dim() < 1 or b.shape[1] != a.shape[0]):
                    raise ValueError(f"{name[:-2]}: B {tuple(b.shape)} and A {tuple(a.shape)} differ in rank")
        return state

    def aggregate(self, replies: list[Reply]) -> None:
        for r in replies:
            self.node_versions[r.node_id] = int(r.metrics[VERSION_KEY])
        self.server.aggregate([(r.state, r.weight) for r in replies], self.dense_opt.step)

    def observe_train(self, replies: list[Reply]) -> dict[str, float]:
        """The largest relative difference of the backbone a client trained from (its reply's checksum) from
        the server's, which is at that version until these replies are merged: the check of every round,
        also those without client evaluation (client-eval-every)."""
        reference = checksum(self.server.backbone.base)
        self._diffs = [abs(float(r.metrics["base-checksum"]) - reference) / reference for r in replies
                       if "base-checksum" in r.metrics and int(r.metrics[VERSION_KEY]) == self.server.version]
        return {"backbone_checksum_rel_diff": max(self._diffs)} if self._diffs else {}

    def observe_evaluation(self, replies: list[Message]) -> dict[str, float]:
        """Node versions, and the largest relative difference of a client's backbone from the server's, over
        this round's train and evaluate replies (none without evaluate replies: the train check stands)."""
        reference = checksum(self.server.backbone.base)
        diffs = []
        for msg in replies:
            metrics = msg.content["metrics"]
            if VERSION_KEY in metrics and "base-checksum" in metrics:
                self.node_versions[msg.metadata.src_node_id] = int(metrics[VERSION_KEY])
                diffs.append(abs(float(metrics["base-checksum"]) - reference) / reference)
        diffs, self._diffs = diffs + self._diffs, []
        return {"backbone_checksum_rel_diff": max(diffs, default=math.nan)} if replies else {}

    def load_into(self, model: nn.Module, state: State | None = None) -> None:
        """The backbone and dense tensors (heads reset: nothing pending)."""
        if state is None:
            load(model, self.server.backbone.base, self.server.dense)
        else:
            load(model, global_base(state), global_dense(state))

    def extra_state(self) -> tuple[State, dict]:
        """The version, and under server momentum the backbone's velocities and the dense tensors' moments."""
        return {f"velocity/{k}": v for k, v in self.server.backbone.velocity.items()} | \
            self.dense_opt.state_tensors("dense-opt/"), {"version": self.server.version}

    def restore(self, global_state: State, extra: State, meta: dict) -> None:
        """The backbone at the checkpoint's version. Neither the update history nor the nodes'
        versions are kept (a node may have restarted too), so every node catches up with the whole
        backbone once."""
        self.server.backbone = Backbone(global_base(global_state), int(meta["version"]), global_velocity(extra))
        self.dense_opt.load_state_tensors(extra, "dense-opt/")
        self.server.dense = global_dense(global_state)
        self.server.updates = {}
        self.node_versions = {}

    def node_failed(self, node_id: int) -> None:
        """A node whose reply failed may not hold the version it last reported (it may have restarted):
        send it everything it could need next time."""
        self.node_versions.pop(node_id, None)

    def global_state(self) -> State:
        return {f"base/{k}": v for k, v in self.server.backbone.base.items()} | \
               {f"dense/{k}": v for k, v in self.server.dense.items()}
