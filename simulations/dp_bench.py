"""What DP-SGD costs per step: the same local training with and without DP-SGD, on one device.

``python -m fedmeld.simulations.dp_bench --out FILE.json [--model vit_small_patch16_224 --batch 64]``
trains a random-init timm model (LoRA + norm + head) on synthetic uint8 images through
``engine.train``, once plainly (AdamW) and once with DP-SGD (``task/privacy.py``: Poisson batches
of expected size ``--batch``, per-example gradients by vmap, clipping, noise), seeded and with the
secure noise source, and writes images per second, peak memory and the DP/plain time ratio. Each
variant runs a warm-up call first; the measured call's own seconds are reported. On a shared machine
``--repeats N`` measures the variants in turn N times and keeps each one's fastest call.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from fedmeld.server.report import hardware, versions
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.engine import Inputs, pick_device, train
from fedmeld.task.model import build_model, make_optimizer


def measure(cfg: RunConfig, batches: int, device: torch.device) -> dict[str, float]:
    """Images per second and peak memory of ``engine.train`` over ``batches`` x batch-size images."""
    info = TaskInfo(flag="synthetic", task="multi-class", num_classes=2, in_chans=3)
    g = torch.Generator().manual_seed(0)
    n = batches * cfg.batch_size
    data = Split(torch.randint(0, 256, (n, 3, cfg.model_size, cfg.model_size), generator=g, dtype=torch.uint8),
                 torch.randint(0, 2, (n, 1), generator=g))
    model = build_model(cfg, info).to(device)
    runs = []
    for seed in (0, 1):  # warm-up, measured
        runs.append(train(model, data, info, epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                          device=device, seed=seed, inputs=Inputs.of(cfg), optimizer=make_optimizer(model, cfg),
                          precision=cfg.precision))
    stats = runs[-1]
    return {"img_per_s": stats["samples_seen"] / stats["train_seconds"], "train_seconds": stats["train_seconds"],
            "samples_seen": stats["samples_seen"], "peak_memory_mb": stats["peak_memory_mb"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmeld.simulations.dp_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches per measured call")
    parser.add_argument("--peft", default="lora+norm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants; each keeps its fastest")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    base = {"model": args.model, "peft": args.peft, "batch-size": args.batch, "lr": 1e-3, "device": args.device}
    size = {"image-size": 224} if args.image_size == 224 else {"image-size": 28, "input-size": args.image_size}
    variants = {"plain": {}, "dp": {"dp-clip": 1.0, "dp-noise": 1.0},
                "dp_secure_rng": {"dp-clip": 1.0, "dp-noise": 1.0, "dp-secure-rng": True}}
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            got = measure(RunConfig.from_mapping({**base, **size, **extra}), args.batches, device)
            print(f"[dp_bench] {name}: {got['img_per_s']:.1f} img/s, {got['peak_memory_mb']:.0f} MB peak", flush=True)
            if name not in results or got["img_per_s"] > results[name]["img_per_s"]:
                results[name] = got
    plain = results["plain"]["train_seconds"] / results["plain"]["samples_seen"]
    ratios = {f"{k}_over_plain_time_per_image": v["train_seconds"] / v["samples_seen"] / plain
              for k, v in results.items() if k != "plain"}
    out = {"what": "engine.train, one local epoch of synthetic images, plain AdamW vs DP-SGD (clip 1, sigma 1, "
                   "Poisson batches of the expected size); time per image", "model": args.model,
           "image_size": args.image_size, "peft": args.peft, "batch_size": args.batch, "batches": args.batches,
           "repeats": args.repeats,
           "precision": "bf16 autocast" if device.type == "cuda" else "fp32", **results, **ratios,
           "hardware": hardware(), "versions": versions(), "date": datetime.now().isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
