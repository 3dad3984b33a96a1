"""The fedmeld ServerApp: broadcast the global model, aggregate the replies, evaluate, record.

The server builds the same model as the clients (same timm name, same seed or weights), so it
can evaluate the global model on the official test split and export it merged. What travels and
how replies combine is the run's protocol (``RunConfig.protocol``): ``server/delta.py`` or
``server/backbone_merge.py``; everything else is the one strategy of ``server/strategy.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmeld.server.backbone_merge import BackboneMergeProtocol
from fedmeld.server.checkpoint import Checkpoint
from fedmeld.server.delta import DeltaProtocol
from fedmeld.server.evaluation import CentralEvaluation
from fedmeld.server.strategy import BudgetSpent, FedmeldStrategy, PrivacyBudget
from fedmeld.task.config import RunConfig
from fedmeld.task.flower import shorten_grid_waits, trace_grid
from fedmeld.task.privacy import ClientDP, Ledger, check_model

app = ServerApp()
log = logging.getLogger(__name__)
PROTOCOLS = {"delta": DeltaProtocol, "backbone-merge": BackboneMergeProtocol}


@app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_grid_waits(grid)
    federate(grid, RunConfig.from_mapping(context.run_config))


def federate(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round; return the run directory. The run config travels in every instruction,
    so each client trains exactly the model this server aggregates."""
    trace_grid(grid)  # FEDMELD_TRACE: where a round's time goes, in every runtime (fedmeld.task.trace)
    checkpoint = Checkpoint.load(Path(cfg.resume).expanduser()) if cfg.resume else None
    if checkpoint is not None:
        checkpoint.check(cfg)
    done = checkpoint.round if checkpoint else 0  # rounds completed before this process
    central = CentralEvaluation.start(cfg, checkpoint)
    kind = PROTOCOLS[cfg.protocol]
    model = kind.build_model(cfg, central.info).to(central.device)
    protocol = kind.for_run(cfg, model)
    if checkpoint is not None:
        protocol.restore(checkpoint.parts["global"], checkpoint.parts["protocol"], checkpoint.protocol_meta)
    ledger = Ledger(checkpoint.privacy if checkpoint else None)  # DP: what every client has spent so far
    if cfg.dp_clip:
        check_model(model)  # the clients' model: BatchNorm statistics must not train under DP-SGD
    if cfg.client_dp_clip:  # the config allows it only with fedavg/ffa, whose rule it replaces
        protocol.rule = ClientDP.of(cfg, ledger)
    if (cfg.dp_clip or cfg.client_dp_clip) and not cfg.dp_secure_rng:
        log.warning("DP noise is drawn from the run's seed, which every node knows: fine for experiments, no "
                    "protection in a deployment; set dp-secure-rng=true there")
    strategy = FedmeldStrategy(protocol, min_replies=min(cfg.min_clients, cfg.num_clients), seed=cfg.seed,
                               round_offset=done, num_partitions=cfg.num_clients, fraction_train=cfg.fraction_train,
                               fraction_evaluate=cfg.fraction_train, min_train_nodes=1, min_evaluate_nodes=1,
                               evaluate_every=cfg.client_eval_every, last_round=cfg.num_server_rounds,
                               min_available_nodes=min(cfg.min_clients, cfg.num_clients),
                               budget=PrivacyBudget.of(cfg, ledger))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += done
        if done and server_round == done:  # Flower's round 0 of a resumed run: evaluated before the stop
            return MetricRecord()
        protocol.load_into(model)
        metrics = central(model, server_round, strategy.round_stats.get(server_round, {}), protocol.global_state())
        if server_round:
            extra, meta = protocol.extra_state()
            Checkpoint(server_round, cfg.to_flower(), central.recorder.initial, meta,
                       {"global": protocol.global_state(), "protocol": extra,
                        "selected": central.selected}, ledger.to_json()).save(central.recorder.run_dir)
        return metrics

    try:
        strategy.start(grid, ArrayRecord(), num_rounds=cfg.num_server_rounds - done, timeout=cfg.round_timeout,
                       train_config=ConfigRecord(cfg.to_flower()), evaluate_config=ConfigRecord(cfg.to_flower()),
                       evaluate_fn=central_evaluate)
    except BudgetSpent as spent:  # raised before the round's instructions go out: rounds so far stand
        log.warning("%s", spent)
        print(f"[fedmeld] privacy budget: {spent}", flush=True)
    last = protocol.export_state(model)
    selected = protocol.export_state(model, central.selected) if central.selected else None
    return central.finish(model, protocol.load_into, last, protocol.global_state(), selected)
