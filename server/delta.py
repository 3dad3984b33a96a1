"""The delta protocol: clients send adapter deltas; global += server step(rule(deltas)).

Every node gets the same global adapter state; a client replies with local − global of every
tensor that travels (``local-params`` stay on the client). The run's aggregation rule
(``task/aggregators/``) combines the deltas, the server optimizer turns the result into the step.
Under ``client-ranks`` smaller LoRA factors are zero-padded to the global rank first (HetLoRA).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord
from torch import nn

from fedmeld.peft import adapter_state, load_adapter_state, resize_ranks
from fedmeld.server.optimizers import ServerOptimizer
from fedmeld.server.strategy import Protocol, Reply, State
from fedmeld.task.aggregators import AggregateFn, Aggregator
from fedmeld.task.config import RunConfig
from fedmeld.task.data import TaskInfo
from fedmeld.task.model import build_model, is_local


class DeltaProtocol(Protocol):
    def __init__(self, state: State, rule: Aggregator | AggregateFn, server_opt: ServerOptimizer | None = None,
                 pad_ranks: bool = False, local: State | None = None) -> None:
        self.state = state  # what travels and is averaged
        self.rule = rule
        self.server_opt = server_opt or ServerOptimizer()
        self.pad_ranks = pad_ranks  # client-ranks: smaller LoRA factors are zero-padded (HetLoRA)
        self.local = local or {}  # local-params: each client keeps its own; the server evaluates with its initial
        self.memory: dict[str, float] = {}  # a stateful rule's per-client scores (direction-memory), checkpointed

    @classmethod
    def for_run(cls, cfg: RunConfig, model: nn.Module) -> DeltaProtocol:
        state = {k: v.cpu() for k, v in adapter_state(model).items()}
        server_opt = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_beta1, cfg.server_beta2,
                                     cfg.server_tau)
        return cls({k: v for k, v in state.items() if not is_local(k, cfg)}, cfg.aggregator, server_opt,
                   pad_ranks=bool(cfg.client_ranks), local={k: v for k, v in state.items() if is_local(k, cfg)})

    @staticmethod
    def build_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
        """The server's model: the clients' (under client-ranks, at the largest rank)."""
        return build_model(cfg.for_client(None), info)

    def payload(self, node_id: int) -> tuple[State, dict[str, ConfigRecord], int]:
        return self.state, {}, 0

    def expected(self) -> dict[str, tuple[tuple[int | None, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def prepare(self, state: State) -> State:
        return resize_ranks(state, self.state) if self.pad_ranks else state

    def aggregate(self, replies: list[Reply]) -> None:
        deltas, weights = [r.state for r in replies], [r.weight for r in replies]
        if isinstance(self.rule, Aggregator):  # registered: robust rules score s·B·A against the global state
            merged = self.rule(deltas, weights, self.state, [r.client for r in replies], self.memory)
        else:  # a bare (deltas, weights) function
            merged = self.rule(deltas, weights)
        step = self.server_opt.step(merged)
        self.state = {k: (v + step[k]).to(v.dtype) for k, v in self.state.items()}

    def load_into(self, model: nn.Module, state: State | None = None) -> None:
        load_adapter_state(model, {**self.local, **(self.state if state is None else state)})

    def global_state(self) -> State:
        return self.state

    def extra_state(self) -> tuple[State, dict]:
        """The server optimizer's moments (FedAvgM, FedAdam, FedYogi) and the rule's per-client memory."""
        return self.server_opt.state_tensors(), {"rule_memory": dict(self.memory)}

    def restore(self, global_state: State, extra: State, meta: dict) -> None:
        if global_state.keys() != self.state.keys():
            raise ValueError("the checkpoint's adapter tensors differ from this run's")
        self.state = {k: global_state[k] for k in self.state}
        self.memory = dict(meta.get("rule_memory", {}))
        self.server_opt.load_state_tensors(extra)
