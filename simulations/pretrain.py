"""Pretrain a timm backbone without a download, for ``weights=FILE`` (or ``weights=DIR``).

``fedmeld pretrain --model resnet18 --source fractal --seconds 200 --out pretrained/fractal/resnet18.safetensors``

Sources: ``fractal`` (formula-driven supervised learning: classify IFS categories rendered on the
device on the fly, ``task/fractal.py``) and ``medmnist`` (supervised on the union of the labels of
``--datasets``, which must not include the ``--target`` the backbone is meant for). Chain them with
``--init``: ``--source medmnist --init pretrained/fractal/resnet18.safetensors`` continues from a
fractal backbone (with a new classifier).

The file holds the backbone in bf16 without its classifier (any run resizes it), its first conv
stored for 3 input channels (a grayscale-trained filter divided by 3 per channel: timm sums it back
for 1-channel data and it sees an RGB image's mean), and a JSON card beside it (``FILE.json``: source,
steps, images seen, resolution, normalisation, date, hardware, the command). A checkpoint
(``FILE.ckpt.pt``) is written every ``--checkpoint-every`` seconds: the same command, run again,
continues where it stopped (the budget counts the seconds already spent); once the file exists it
says so and does nothing. The clock starts after each process's first step: that step's warm-up
(cuDNN autotuning, lazy CUDA initialisation, the first transfers; 30 s on a busy H200 host) is timed
apart, in the card's ``warmup_seconds``, so a short ``--seconds`` budget still trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fedmeld.server.report import atomic_write, hardware, versions
from fedmeld.task.config import MEDMNIST_2D, PRECISIONS, ConfigError, RunConfig
from fedmeld.task.data import DataFileError, TaskInfo, load_split, task_info
from fedmeld.task.engine import Inputs, _autocast, adamw, pick_device
from fedmeld.task.fractal import AUGMENTS, FractalConfig, FractalImages
from fedmeld.task.model import WeightsError, create_backbone

NORMALISATION = "x / 127.5 - 1 (MedMNIST's mean 0.5, std 0.5: pixels in [-1, 1]), as fedmeld's engine"
Batches = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (step, batch size) -> images, labels
# what defines the result: a checkpoint or a finished file made with other values is not continued
TRAINING_ARGS = ("model", "model_args", "source", "resolution", "in_chans", "categories", "fractal_augment", "datasets",
                 "target", "init", "seconds", "images", "batch_size", "lr", "weight_decay", "warmup", "label_smoothing",
                 "seed", "precision")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedmeld pretrain", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", required=True, help="timm model name (resnet18, convnext_atto, efficientnet_b0, "
                                                       "vit_tiny_patch16_224, ...)")
    parser.add_argument("--model-args", default="", help="timm.create_model keyword arguments as the run key "
                                                         "model-args (e.g. patch_size=8); runs that load the file "
                                                         "must use the same")
    parser.add_argument("--source", choices=("fractal", "medmnist"), required=True,
                        help="fractal: IFS categories rendered on the device; medmnist: the --datasets' labels")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.safetensors",
                        help="the weights file to write (its card: FILE.json, its checkpoint: FILE.ckpt.pt); "
                             "for weights=DIR name it DIR/<model>.safetensors")
    parser.add_argument("--seconds", type=float, default=0.0, help="training budget in seconds (over every resume; "
                        "the clock starts after the first step, whose warm-up is reported apart)")
    parser.add_argument("--images", type=int, default=0, help="training budget in images; with --seconds, the "
                                                              "first reached ends the run")
    parser.add_argument("--resolution", type=int, default=64, help="input side in px: the input-size of the runs "
                                                                   "that fine-tune it (default 64)")
    parser.add_argument("--in-chans", type=int, choices=(1, 3), default=1, help="channels trained on (fractals are "
                                                                               "grayscale; default 1)")
    parser.add_argument("--categories", type=int, default=1000, help="fractal: IFS categories (default 1000)")
    parser.add_argument("--fractal-augment", choices=AUGMENTS, default="light",
                        help="fractal: what varies an instance besides its maps' jitter: none; light (default: "
                             "flip, zoom, shift, point density); full (also rotation, blur, levels, inversion, "
                             "noise: a harder task, learnt slower)")
    parser.add_argument("--datasets", default="retinamnist,pneumoniamnist",
                        help="medmnist: comma-separated flags whose train splits are learnt (28 px files)")
    parser.add_argument("--target", default="breastmnist", help="medmnist: the dataset the backbone is for; "
                                                                "refused in --datasets")
    parser.add_argument("--data-root", default="", help="directory of the MedMNIST files (as the run key data-root)")
    parser.add_argument("--init", default="", help="start from this pretrained file (e.g. the fractal one), with "
                                                   "a new classifier")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (linear warmup, then "
                                                               "cosine to 0 over the budget; default 2e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the budget spent warming up the lr (default "
                                                                         "0.05)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing "
                                                                          "(default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the categories, the batches and the init")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="autocast on CUDA (the CPU: fp32)")
    parser.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between checkpoints (default 30)")
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines (default 10)")
    args = parser.parse_args(argv)
    problems = [f"{name} must be > 0" for name in ("batch_size", "lr", "resolution", "checkpoint_every", "log_every")
                if getattr(args, name) <= 0]
    if args.seconds <= 0 and args.images <= 0:
        problems.append("give a budget: --seconds S and/or --images N")
    if args.out.suffix != ".safetensors":
        problems.append(f"--out must end in .safetensors (got {args.out})")
    if args.source == "medmnist":
        flags = [f.strip() for f in args.datasets.split(",") if f.strip()]
        bad = [f for f in flags if f not in MEDMNIST_2D or task_info(f).multi_label]
        if not flags or bad:
            problems.append(f"--datasets {args.datasets!r}: single-label MedMNIST 2D flags, e.g. "
                            f"retinamnist,pneumoniamnist")
        if args.target in flags:
            problems.append(f"--datasets includes the target {args.target}: pretraining on it would leak its "
                            f"images into the backbone; leave it out")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wanted = {k: getattr(args, k) for k in TRAINING_ARGS}
    card_path, ckpt_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".ckpt.pt")
    if args.out.is_file() and card_path.is_file():
        made = json.loads(card_path.read_text()).get("args")
        if made != _jsonable(wanted):
            print(f"fedmeld pretrain: {args.out} exists and was made with other arguments ({card_path}); "
                  f"choose another --out or remove it", file=sys.stderr)
            return 2
        print(f"[pretrain] {args.out} is done already ({card_path})", flush=True)
        return 0
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # one input shape throughout: let cuDNN pick its fastest kernels
    try:
        batches, classes, source_card = _source(args, device)
        model = _model(args, classes)
    except (ConfigError, WeightsError, DataFileError) as err:
        print(f"fedmeld pretrain: {err}", file=sys.stderr)
        return 2
    model.to(device, memory_format=torch.channels_last) if device.type == "cuda" else model.to(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    opt = adamw(list(model.parameters()), args.lr, args.weight_decay)
    state = {"step": 0, "seen": 0, "elapsed": 0.0, "warmup": 0.0, "loss": math.nan, "accuracy": math.nan}
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["args"] != _jsonable(wanted):
            print(f"fedmeld pretrain: checkpoint {ckpt_path} belongs to a run with other arguments; remove it or "
                  f"choose another --out", file=sys.stderr)
            return 2
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = {"warmup": 0.0, **ckpt["state"]}  # a checkpoint from before warm-up was timed apart
        print(f"[pretrain] resuming from {ckpt_path}: step {state['step']}, {state['seen']:,} images, "
              f"{state['elapsed']:.0f} s", flush=True)
    else:
        print(f"[pretrain] {args.source} -> {args.model} ({sum(p.numel() for p in model.parameters()):,} params, "
              f"{classes} classes, {args.resolution} px) on {device}", flush=True)

    def checkpoint() -> None:
        atomic_write(ckpt_path, lambda tmp: torch.save({"args": _jsonable(wanted), "model": model.state_dict(),
                                                        "optimizer": opt.state_dict(), "state": state}, tmp))

    _train(model, opt, batches, args, device, state, checkpoint)
    card = {"file": args.out.name, "model": args.model, "model_args": args.model_args, "source": args.source,
            **source_card, "classes": classes, "steps": state["step"], "images_seen": state["seen"],
            "seconds": round(state["elapsed"], 1), "warmup_seconds": round(state["warmup"], 1),
            "final_train_loss": state["loss"],
            "final_train_accuracy": state["accuracy"], "resolution": args.resolution, "in_chans": args.in_chans,
            "stored_in_chans": 3, "normalisation": NORMALISATION, "dtype": "bfloat16", "classifier": "left out",
            "date": datetime.now().isoformat(timespec="seconds"), "hardware": hardware(), "versions": versions(),
            "command": "fedmeld pretrain " + shlex.join(argv), "args": _jsonable(wanted)}
    _write(model, args, card, card_path)
    ckpt_path.unlink(missing_ok=True)
    print(f"[pretrain] wrote {args.out} ({card['bytes'] / 2**20:.1f} MiB) and {card_path}: {state['step']} steps, "
          f"{state['seen']:,} images in {state['elapsed']:.0f} s (+ {state['warmup']:.1f} s of warm-up), "
          f"last loss {state['loss']:.3f}", flush=True)
    return 0


def _write(model: nn.Module, args: argparse.Namespace, card: dict[str, Any], card_path: Path) -> None:
    """The weights file (the card in its metadata too), then the card with the file's size and hash;
    each written whole or not at all."""
    if args.init:
        init_card = Path(args.init).with_name(Path(args.init).name + ".json")
        card["init_card"] = json.loads(init_card.read_text()) if init_card.is_file() else None
    tensors = backbone_tensors(model, args.in_chans)
    atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata={"fedmeld_card": json.dumps(card)}))
    args.out.chmod(0o644)  # safetensors writes 0600; the file is meant to be copied between machines
    card.update(bytes=args.out.stat().st_size, sha256=hashlib.sha256(args.out.read_bytes()).hexdigest())
    atomic_write(card_path, lambda tmp: tmp.write_text(json.dumps(card, indent=1) + "\n"))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _model(args: argparse.Namespace, classes: int) -> nn.Module:
    """The backbone as the runs build it (``create_backbone``), with a classifier over the source's
    classes: random init from ``--seed``, or ``--init``'s weights."""
    cfg = RunConfig.from_mapping({"model": args.model, "model-args": args.model_args, "input-size": args.resolution,
                                  "weights": args.init, "seed": args.seed})
    return create_backbone(cfg, TaskInfo("pretrain", "multi-class", classes, args.in_chans))


def _source(args: argparse.Namespace, device: torch.device) -> tuple[Batches, int, dict[str, Any]]:
    """(batches, number of classes, what the card says about the data)."""
    if args.source == "fractal":
        cfg = FractalConfig(categories=args.categories, seed=args.seed, resolution=args.resolution,
                            augment=args.fractal_augment)
        images = FractalImages(cfg, device)

        def fractal(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = images.batch(step, size)
            return (x.expand(-1, args.in_chans, -1, -1) if args.in_chans > 1 else x), y

        return fractal, args.categories, {"fractal": asdict(cfg)}
    flags = [f.strip() for f in args.datasets.split(",") if f.strip()]
    images, labels, offset = [], [], 0
    for flag in flags:
        split = load_split(flag, "train", 28, args.data_root)
        x = split.images
        if x.shape[1] != args.in_chans:  # RGB -> gray as the channel mean, gray -> RGB by repeating
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if args.in_chans == 1 \
                else x.expand(-1, 3, -1, -1)
        images.append(x)
        labels.append(split.labels[:, 0] + offset)
        offset += task_info(flag).num_classes
    data, targets = torch.cat(images).to(device), torch.cat(labels).to(device)
    inputs = Inputs(args.resolution, "bilinear", "light")

    def medmnist(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(targets), (size,), generator=gen).to(device)
        return inputs(data[idx], device, gen), targets[idx]

    return medmnist, offset, {"medmnist": {"datasets": flags, "split": "train", "image_size": 28,
                                           "train_images": len(targets), "target_excluded": args.target,
                                           "augment": "light"}}


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: Batches, args: argparse.Namespace,
           device: torch.device, state: dict[str, Any], checkpoint: Callable[[], None]) -> None:
    """Steps until the budget is spent; the device is waited for only at a progress line or checkpoint,
    and once after this process's first step, whose time goes to ``state["warmup"]``, not the budget."""
    model.train()
    started = time.perf_counter()
    began: float | None = None  # when the budget's clock (re)started, less the seconds spent before a resume
    last_log = last_ckpt = started
    logged_seen = state["seen"]  # images seen at the last progress line (or at the warm-up's end): the rate's base
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    window = 0

    def progress() -> float:
        return max(state["elapsed"] / args.seconds if args.seconds else 0.0,
                   state["seen"] / args.images if args.images else 0.0)

    while progress() < 1:
        done = progress()
        lr = args.lr * (done / args.warmup if done < args.warmup else
                        0.5 * (1 + math.cos(math.pi * (done - args.warmup) / (1 - args.warmup))))
        for group in opt.param_groups:
            group["lr"] = max(lr, args.lr * 1e-3)
        x, y = batches(state["step"], args.batch_size)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, args.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(-1) == y).sum()
        window += len(y)
        state["step"] += 1
        state["seen"] += len(y)
        if began is None:  # the first step: the clock starts once it has really finished
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            last_log = last_ckpt = time.perf_counter()
            state["warmup"] += last_log - started
            began, logged_seen = last_log - state["elapsed"], state["seen"]
            print(f"[pretrain] first step (warm-up, outside the budget): {last_log - started:.1f} s", flush=True)
        now = time.perf_counter()
        state["elapsed"] = now - began
        if now - last_log >= args.log_every or progress() >= 1:
            state["loss"], state["accuracy"] = loss_sum.item() / window, correct.item() / window
            rate = (state["seen"] - logged_seen) / max(now - last_log, 1e-9)
            print(f"[pretrain] {100 * min(progress(), 1):3.0f}%  {state['elapsed']:5.0f} s  step {state['step']}  "
                  f"{state['seen']:,} images ({rate:,.0f}/s)  loss {state['loss']:.3f}  "
                  f"train acc {state['accuracy']:.3f}  lr {lr:.2e}", flush=True)
            loss_sum.zero_()
            correct.zero_()
            window, last_log, logged_seen = 0, time.perf_counter(), state["seen"]
        if now - last_ckpt >= args.checkpoint_every:
            checkpoint()
            last_ckpt = time.perf_counter()


def backbone_tensors(model: nn.Module, in_chans: int) -> dict[str, torch.Tensor]:
    """The state dict as the file stores it: floating tensors in bf16, the classifier left out, the
    first conv for 3 channels (``in_chans`` 1: the filter / 3 on each, so a summed-back conv is the
    trained one)."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    first = model.pretrained_cfg.get("first_conv")
    if not first or not classifiers:
        raise ConfigError(f"{type(model).__name__} does not name its first conv and classifier in timm's "
                          f"pretrained_cfg, so its file could not be loaded back; pick another model")
    tensors = {}
    for name, value in model.state_dict().items():
        if any(name.startswith(c + ".") for c in classifiers):
            continue
        value = value.detach()
        if name == f"{first}.weight" and in_chans == 1:
            value = value.expand(-1, 3, -1, -1) / 3
        tensors[name] = (value.to(torch.bfloat16) if value.is_floating_point() else value).contiguous().cpu()
    return tensors


if __name__ == "__main__":
    sys.exit(main())
