"""The fedmeld ServerApp: broadcast the global adapter state, aggregate deltas, evaluate, record.

The server builds the same model as the clients (same timm name, same seed or weights), so it
can evaluate the global adapters on the official test split and export the merged model.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid, http_grid

from client.config import RunConfig
from client.model import build_model, is_local
from client.supernode import shorten_waits
from client.wire import pack, unpack
from peft import adapter_state, load_adapter_state, merged_state_dict
from server import lte
from server.aggregation import AGGREGATORS
from server.optimizers import ServerOptimizer
from server.evaluation import CentralEvaluation
from server.strategy import DeltaFedAvg

app = ServerApp()
GRID_SLEEP_CAP = 0.2  # seconds; Flower's deployment Grid sleeps 3 s between polls for replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    if isinstance(grid, HttpGrid):
        # Deployment: this process is Flower's flwr-serverapp, started for this one run. Its Grid
        # (flwr.superlink.grid.http_grid) sleeps 3 s between reply polls and backs off 1 s, 2 s, ...
        # while a reply's objects arrive: up to 3 s lost per phase, two phases a round. Cap them as
        # client/supernode.py does for the SuperNode (it refuses a flwr whose module differs from 1.41's).
        shorten_waits(http_grid, GRID_SLEEP_CAP)
    federate(grid, RunConfig.from_mapping(context.run_config))


def federate(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round; return the run directory. The run config travels in every instruction,
    so each client trains exactly the model and adapters this server aggregates."""
    if cfg.updates_backbone:
        return lte.federate(grid, cfg)
    central = CentralEvaluation.start(cfg)
    model = build_model(cfg.for_client(None), central.info).to(central.device)  # client-ranks: the largest
    state = {k: v.cpu() for k, v in adapter_state(model).items()}
    initial = {k: v for k, v in state.items() if not is_local(k, cfg)}
    local = {k: v for k, v in state.items() if is_local(k, cfg)}  # each client keeps its own; the server its initial
    server_opt = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_beta1, cfg.server_beta2,
                                 cfg.server_tau)
    strategy = DeltaFedAvg(
        initial, AGGREGATORS[cfg.aggregation], server_opt, pad_ranks=bool(cfg.client_ranks),
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_train,
        min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=min(cfg.min_clients, cfg.num_clients),
    )

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_state(model, {**local, **unpack(arrays)})
        metrics = central(model, server_round, strategy.round_stats.get(server_round, {}))
        if server_round:
            central.recorder.checkpoint(strategy.global_state, server_round)
        return metrics

    strategy.start(grid, pack(initial), num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                   train_config=ConfigRecord(cfg.to_flower()), evaluate_config=ConfigRecord(cfg.to_flower()),
                   evaluate_fn=central_evaluate)

    load_adapter_state(model, {**local, **strategy.global_state})
    return central.finish(model, merged_state_dict(model),
                          adapter_bytes=sum(t.numel() * t.element_size() for t in strategy.global_state.values()))
