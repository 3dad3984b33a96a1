"""Training speed and memory of each fine-tuning mode, side by side in one process.

    fedmeld bench --out $OUT/bench.json                     # device: every model, mode and loop
    fedmeld bench --device cpu --models resnet10t --batch 8 --img 32 --steps 3 \\
        --warmup 1 --repeats 1 --modes full lora head --data-model resnet10t   # CPU smoke run

Every row is one model, one mode, one loop and one compile setting: a fresh timm model (random
init: speed does not depend on the weights) with that mode's trainable set. Each PEFT mode also
trains the classifier head. Two loops:

- ``harness`` (``"loop": "harness"``): this module's own step, AdamW (fused on CUDA), bf16 autocast,
  channels_last, synthetic data already on the device: the modes and nothing else;
- ``product`` (``"loop": "product"``): ``task/engine.py``'s ``train``, the code every client runs,
  with the client's optimizer (``task/model.py``'s ``make_optimizer``) and its data path: the
  ``--data-flag`` train split as uint8 28 px images, resized to ``--img`` on the device. Its
  ``compile`` is the run-config key (``off``, ``default``, ``cudagraphs``); ``compile_s`` is the
  time the call spent compiling or capturing, which ``img_per_s`` leaves out.

Ratios against ``full`` are recomputable from the rows of one run, within one loop and compile setting.

``hf-peft-lora`` is Hugging Face peft (``import peft``; ours is ``fedmeld.peft``), on the same
layers as our LoRA rows.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmeld.task.config import COMPILE_MODES, RunConfig

LOOPS = ("harness", "product")
MODES = ("full", "hf-peft-lora", "lora", "lora-naive", "lora-keep-act", "lora-frozen-a", "norm", "norm-floor", "head")
DEFAULT_MODES = ("full", "hf-peft-lora", "lora", "lora-frozen-a", "norm", "norm-floor", "head")
DEPLOY, SIMULATE = "fedmeld.simulations.deploy", "fedmeld.simulations.run"
FEDERATION_RUNTIMES = {  # --federation's runtimes: name -> (python -m command, client-eval-every = the rounds)
    "simulation": ([SIMULATE, "--backend", "inprocess"], False),
    "simulation_eval_last": ([SIMULATE, "--backend", "inprocess"], True),
    "deployment": ([DEPLOY], False),  # the SuperLink's state on disk (the default, survives a restart)
    "deployment_memory": ([DEPLOY, "--superlink-state", "memory"], False),
    "deployment_memory_eval_last": ([DEPLOY, "--superlink-state", "memory"], True),
}
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
Batch = Callable[[], tuple[Tensor, Tensor]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedmeld bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["vit_base_patch16_224", "vit_small_patch16_224", "convnext_tiny"],
                   help="timm model names, each measured in every mode (none: no speed rows, no data path)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                   help="fine-tuning modes; 'full' is the baseline of every ratio; 'lora-naive' is our LoRA "
                        "with the merged-weight path off (the plain W x + s B(A x)); 'lora-keep-act' is our "
                        "LoRA keeping each MLP's GELU output for backward (PeftConfig.lora_recompute_act=False)")
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS),
                   help="harness: this module's own training step; product: task/engine.py's train, as clients run it")
    p.add_argument("--product-compile", nargs="+", choices=COMPILE_MODES,
                   help="compile settings (the run-config key) of the product rows; default: off and, on CUDA, "
                        "cudagraphs")
    p.add_argument("--compile", action="store_true", help="also measure every harness mode under torch.compile "
                                                          "(hf-peft-lora stays eager)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode of the compiled rows; 'reduce-overhead' replays CUDA graphs, which "
                        "removes the per-kernel launch cost that bounds small models' steps")
    p.add_argument("--compile-models", nargs="+", metavar="MODEL",
                   help="limit the compiled rows (both loops) to these models (default: all of --models)")
    p.add_argument("--compile-modes", nargs="+", choices=MODES, metavar="MODE",
                   help="limit the compiled rows (both loops) to these modes (default: all of --modes); compiling "
                        "takes most of a compiled row's time")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--img", type=int, default=224, help="input size in pixels (square)")
    p.add_argument("--num-classes", type=int, default=2, help="classifier width of the synthetic rows")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank) for ours and HF peft")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, cuDNN/cuBLAS choice)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per row; img/s is their median")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--data-flag", default="breastmnist",
                   help="MedMNIST dataset of the product rows and the data-path figure (its 28 px train split, "
                        "read from --data-root, then $MEDMNIST_ROOT); 'none' skips both")
    p.add_argument("--data-root", default="", help="folder holding <flag>.npz")
    p.add_argument("--data-model", help="model of the data-path figure (default: the first of --models)")
    p.add_argument("--data-mode", default="lora", choices=[m for m in MODES if m != "hf-peft-lora"],
                   help="mode of the data-path figure (eager)")
    p.add_argument("--profile", nargs="*", default=[], metavar="MODEL:MODE[:compile]",
                   help="after measuring these rows, write a torch.profiler table of a few steps to "
                        "<out>.profile.txt")
    p.add_argument("--federation", nargs="*", metavar="key=value",
                   help="also measure where a federated round's time goes (run-config overrides on top of "
                        "simulations.scaling's defaults: 8 clients, PneumoniaMNIST at 224 px, ViT-S, LoRA, 1 local "
                        "epoch): each client's train + evaluate in a bare loop, then the same job under the in-process "
                        "simulation Grid and under the deployment runtime (SuperLink + SuperNodes on localhost; its "
                        "state on disk and in memory), each also with client-eval-every = the rounds (no evaluate "
                        "phase but the last round's), traced hop by hop (fedmeld.task.trace); the runs go to "
                        "<out's folder>/fed-runs unless an out= override says where")
    p.add_argument("--federation-runtimes", nargs="+", choices=FEDERATION_RUNTIMES, default=list(FEDERATION_RUNTIMES),
                   help="which runtimes --federation measures (default: all; a deployment takes minutes to start "
                        "its processes, so a time-limited call may measure them in turns)")
    p.add_argument("--out", default="bench.json", help="JSON output path")
    args = p.parse_args(argv)
    args.product_compile = args.product_compile or ["off", *(["cudagraphs"] if args.device.startswith("cuda") else [])]
    return args


# --- one measurement -----------------------------------------------------------

def synthetic(batch: int, img: int, num_classes: int, device: torch.device) -> Batch:
    """One fixed random batch, already on the device: measures the model, not a loader."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, img, img, device=device, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (batch,), device=device, generator=gen)
    return lambda: (x, y)


class DeviceSplit:
    """A uint8 MedMNIST split resident on the device; batches are sampled, augmented and resized there.

    Normalising and flipping happen at the files' 28 px (both commute with bilinear resizing),
    so the only full-size pass is the resize itself.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch: int, img: int, device: torch.device) -> None:
        self.images = images.to(device)  # (N, C, 28, 28) uint8
        self.labels = labels[:, 0].to(device)
        self.batch, self.img = batch, img

    def __call__(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.labels), (self.batch,), device=self.images.device)
        x = self.images[idx].float().mul_(2 / 255).sub_(1)
        flip = torch.rand(self.batch, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(3), x)
        x = F.interpolate(x, size=(self.img, self.img), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)  # grey -> RGB
        return x, self.labels[idx]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, batch_fn: Batch, args: argparse.Namespace, compiled: bool,
            profile_to: list[str] | None = None) -> dict:
    """img/s (median of --repeats windows) and peak GiB of training ``model``'s trainable set."""
    device = torch.device(args.device)
    model.to(device, memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model, mode=args.compile_mode) if compiled else model

    def step() -> None:
        x, y = batch_fn()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    windows = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        windows.append(time.perf_counter() - start)
    if profile_to is not None:
        profile_to.append(profile_table(step, device))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_per_s": round(args.batch * args.steps / statistics.median(windows), 1),
            "peak_gib": None if peak is None else round(peak, 3),
            "trainable": sum(p.numel() for p in params)}


def profile_table(step: Callable[[], None], device: torch.device) -> str:
    """The ops that take the time over 3 steps, by device time (CPU time without a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def reset_device(device: torch.device) -> None:
    """Free the last row's model, graphs and cached blocks; restart the peak counter."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- the product's loop ---------------------------------------------------------

def product_measure(model: nn.Module, split, info, args: argparse.Namespace, compile_mode: str) -> dict:
    """img/s (median of --repeats calls of --steps batches, compile time left out) and peak GiB of
    ``task/engine.py``'s ``train`` on ``split`` (uint8 images resized to --img on the device), with
    the client's own optimizer, after one untimed call of --warmup batches."""
    import numpy as np

    from fedmeld.task.config import RunConfig
    from fedmeld.task.engine import Inputs, train
    from fedmeld.task.model import make_optimizer

    device = torch.device(args.device)
    cfg = RunConfig.from_mapping({"lr": 1e-4, "weight-decay": 0.0})
    model.to(device)

    def call(batches: int) -> dict:
        data = split.subset(np.resize(np.arange(len(split)), batches * args.batch))  # the split, tiled
        return train(model, data, info, epochs=1, batch_size=args.batch, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     device=device, seed=0, inputs=Inputs(size=args.img), optimizer=make_optimizer(model, cfg),
                     precision=cfg.precision, compile_mode=compile_mode)

    calls = [call(max(args.warmup, 2))] + [call(args.steps) for _ in range(args.repeats)]
    timed = calls[1:]
    speed = statistics.median(c["samples_seen"] / (c["train_seconds"] - c["compile_seconds"]) for c in timed)
    peak = max(c["peak_memory_mb"] for c in calls) / 1024 if device.type == "cuda" else None
    return {"img_per_s": round(speed, 1), "peak_gib": None if peak is None else round(peak, 3),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "compile_s": round(max(c["compile_seconds"] for c in calls), 3),
            "compile_s_first_call": round(calls[0]["compile_seconds"], 3)}


def product_split(args: argparse.Namespace):
    """The --data-flag train split (28 px uint8) and its TaskInfo, or None without data."""
    if args.data_flag == "none":
        return None
    from fedmeld.task.data import load_split, task_info

    return load_split(args.data_flag, "train", size=28, data_root=args.data_root), task_info(args.data_flag)


# --- modes ---------------------------------------------------------------------

def build_model(name: str, num_classes: int, img: int, in_chans: int = 3) -> nn.Module:
    """Random init; models with a fixed input size (ViT) are built for ``img``, convnets take any."""
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=img)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def prepare(model: nn.Module, mode: str, rank: int) -> nn.Module:
    """Give ``model`` the trainable set of ``mode`` (ours, or the hand-written norm floor)."""
    from fedmeld.peft import PeftConfig, apply_peft
    from fedmeld.peft.lora import LoRALinear

    if mode == "norm-floor":  # no fedmeld code: grads for norm affine params and the head only
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.requires_grad_(True)
        model.get_classifier().requires_grad_(True)
        return model
    methods = {"full": "full", "lora": "lora+head", "lora-naive": "lora+head", "lora-keep-act": "lora+head",
               "lora-frozen-a": "lora+head", "norm": "norm+head", "head": "head"}
    apply_peft(model, PeftConfig(method=methods[mode], lora_rank=rank, lora_alpha=2.0 * rank,
                                 lora_freeze_a=mode == "lora-frozen-a", lora_recompute_act=mode != "lora-keep-act"))
    if mode == "lora-naive":
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fast = False
    return model


def hf_peft_model(model_name: str, args: argparse.Namespace, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Hugging Face peft's LoRA on the same layers as our LoRA rows; RuntimeError (why) if not importable."""
    from fedmeld.peft import default_target_modules  # ours
    from fedmeld.peft.lora import matches

    try:
        import peft  # Hugging Face's: ours is fedmeld.peft
    except ImportError as e:
        raise RuntimeError(f"Hugging Face peft is not importable: {e}") from e
    if not hasattr(peft, "LoraConfig"):
        raise RuntimeError(f"'import peft' found {peft.__file__}, not Hugging Face peft: run `fedmeld bench`, "
                           f"not python -m from the repository root (whose peft/ folder shadows it)")
    model = build_model(model_name, num_classes, args.img, in_chans)
    patterns = default_target_modules(model)  # names, suffixes or globs: resolved here to full names
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and matches(n, patterns)]
    head = model.pretrained_cfg["classifier"]
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets,
                          modules_to_save=[head] if isinstance(head, str) else list(head))
    return peft.get_peft_model(model, cfg)


def hf_peft_row(model_name: str, args: argparse.Namespace) -> dict:
    """Hugging Face peft's LoRA in the harness; its row, or a note why not."""
    try:
        model = hf_peft_model(model_name, args, args.num_classes)
    except RuntimeError as e:
        return {"error": str(e)}
    import peft

    return {**measure(model, synthetic(args.batch, args.img, args.num_classes, torch.device(args.device)),
                      args, compiled=False), "hf_peft_version": peft.__version__}


# --- the run -------------------------------------------------------------------

def settings(args: argparse.Namespace, model_name: str, mode: str) -> list[tuple[str, str]]:
    """The (loop, compile) settings a model and mode are measured under."""
    compiles = model_name in set(args.compile_models or args.models) and mode in set(args.compile_modes or args.modes)
    out = []
    if "harness" in args.loops:
        out += [("harness", "off")] + ([("harness", args.compile_mode)]
                                       if args.compile and compiles and mode != "hf-peft-lora" else [])
    if "product" in args.loops and args.data_flag != "none":
        out += [("product", c) for c in args.product_compile if c == "off" or compiles]
    return out


def run_rows(args: argparse.Namespace, profiles: dict[str, str], on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Measure every (model, loop, compile, mode); ``on_row`` gets the rows so far after each one."""
    device = torch.device(args.device)
    data = product_split(args) if args.models and "product" in args.loops else None
    rows = []
    for model_name in args.models:
        for loop, compile_mode in dict.fromkeys(s for mode in args.modes for s in settings(args, model_name, mode)):
            for mode in args.modes:
                if (loop, compile_mode) not in settings(args, model_name, mode):
                    continue
                reset_device(device)
                row = {"model": model_name, "mode": mode, "loop": loop, "compile": compile_mode}
                tag = f"{model_name}:{mode}" + ("" if loop == "harness" else ":product") + \
                    ("" if compile_mode == "off" else f":{compile_mode}")
                table: list[str] | None = [] if tag in args.profile else None
                try:
                    if loop == "product":
                        split, info = data
                        model = hf_peft_model(model_name, args, info.num_classes, info.in_chans) \
                            if mode == "hf-peft-lora" else \
                            prepare(build_model(model_name, info.num_classes, args.img, info.in_chans), mode, args.rank)
                        row.update(product_measure(model, split, info, args, compile_mode))
                        del model
                    elif mode == "hf-peft-lora":
                        row.update(hf_peft_row(model_name, args))
                    else:
                        model = prepare(build_model(model_name, args.num_classes, args.img), mode, args.rank)
                        batch_fn = synthetic(args.batch, args.img, args.num_classes, device)
                        row.update(measure(model, batch_fn, args, compile_mode != "off", table))
                        del model, batch_fn
                except Exception as e:  # one failing row (OOM, compile error) must not lose the run
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                if table:
                    profiles[tag] = table[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
                on_row(rows)
    return rows


def data_path(args: argparse.Namespace) -> dict | None:
    """Synthetic vs MedMNIST-on-device img/s of one model and mode (eager), back to back."""
    if args.data_flag == "none":
        return None
    from fedmeld.task.data import load_split, task_info

    device = torch.device(args.device)
    split = load_split(args.data_flag, "train", size=28, data_root=args.data_root)
    num_classes = task_info(args.data_flag).num_classes
    model_name = args.data_model or args.models[0]
    sources = {"synthetic": synthetic(args.batch, args.img, num_classes, device),
               "medmnist": DeviceSplit(split.images, split.labels, args.batch, args.img, device)}
    result: dict = {"model": model_name, "mode": args.data_mode, "compile": "off", "flag": args.data_flag,
                    "images": len(split), "source_px": tuple(split.images.shape[-2:]),
                    "augment": "random horizontal flip, bilinear resize on the device"}
    for source, batch_fn in sources.items():
        reset_device(device)
        model = prepare(build_model(model_name, num_classes, args.img), args.data_mode, args.rank)
        result[f"{source}_img_per_s"] = measure(model, batch_fn, args, compiled=False)["img_per_s"]
        del model
    result["ratio"] = round(result["medmnist_img_per_s"] / result["synthetic_img_per_s"], 3)
    return result


def bare_clients(cfg: RunConfig, repeats: int = 2) -> dict:
    """Each client's round of work in a plain loop (same model, shards, engine, optimizer and compile
    setting; no Flower): its local training (``train_s``, graph capture or compilation included, as
    a client pays it every round) and the evaluation of its validation split (``evaluate_s``), after
    one untimed round of client 0 that pays CUDA start-up and kernel choice. Each client is timed
    ``repeats`` times and keeps its fastest: a launch-bound model's single call moves by up to 5x with
    the host, and the slowest client is the denominator of ``round_over_slowest``."""
    from fedmeld.client.app import load_shard
    from fedmeld.task.data import task_info
    from fedmeld.task.engine import Inputs, evaluate, pick_device, train
    from fedmeld.task.model import build_model as build_fed_model
    from fedmeld.task.model import make_optimizer

    info, device = task_info(cfg.dataset), pick_device(cfg.device)
    model = build_fed_model(cfg, info).to(device)
    train_s, evaluate_s = [], []
    for pid in [0, *range(cfg.num_clients)]:
        shard, times = load_shard(cfg, pid, cfg.num_clients), []
        for _ in range(repeats):
            stats = train(model, shard.train, info, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, device=device, seed=cfg.seed, inputs=Inputs.of(cfg),
                          optimizer=make_optimizer(model, cfg), precision=cfg.precision, compile_mode=cfg.compile)
            began = time.perf_counter()
            if len(shard.val):
                evaluate(model, shard.val, info, device=device, inputs=Inputs.of(cfg), precision=cfg.precision)
            times.append((stats["train_seconds"], time.perf_counter() - began))
        fastest = min(times, key=sum)
        train_s.append(fastest[0])
        evaluate_s.append(fastest[1])
    train_s, evaluate_s = train_s[1:], evaluate_s[1:]
    both = [t + e for t, e in zip(train_s, evaluate_s)]
    return {"train_s": [round(t, 3) for t in train_s], "evaluate_s": [round(t, 3) for t in evaluate_s],
            "slowest_s": round(max(both), 3), "sum_s": round(sum(both), 3)}


def federated_rounds(command: list[str], run_dir: Path, trace_file: Path) -> dict:
    """Run one of our federation CLIs, traced; its per-round wall time, bytes and per-hop breakdown
    (``fedmeld.task.trace.hops``), steady rounds (after the first)."""
    from fedmeld.task import trace

    trace_file.unlink(missing_ok=True)
    env = {**os.environ, trace.TRACE_ENV: str(trace_file.resolve())}
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": f"{' '.join(command[:2])} exited {done.returncode}: {done.stderr[-400:]}"}
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rounds[1:] or rounds
    return {"round_seconds": [round(r["round_seconds"], 3) for r in rounds],
            "steady_round_s": round(statistics.median(r["round_seconds"] for r in steady), 3),
            "slowest_client_train_s": round(statistics.median(r["slowest_client_train_seconds"] for r in steady), 3),
            "bytes_up_per_client_round": statistics.median(r["bytes_up"] / r["num_clients_ok"] for r in steady),
            "hops": trace.hops(trace.read(trace_file))}


def measure_runtime(runtime: str, job: list[str], cfg: RunConfig, bare: dict, name: str) -> dict:
    """One of ``FEDERATION_RUNTIMES`` on ``job`` (as read into ``cfg``), run as ``name`` under the job's
    ``out``, with its steady round over the bare clients' times (``bare_clients``)."""
    command, eval_last = FEDERATION_RUNTIMES[runtime]
    command = [*command, "--supernodes", str(cfg.num_clients)] if command[0] == DEPLOY else command
    keys = [f"client-eval-every={cfg.num_server_rounds}"] if eval_last else []  # no evaluate phase but the last
    runs = Path(cfg.out).resolve()
    measured = federated_rounds([*command, *job, *keys, f'run-name="{name}"'], runs / name, runs / f"{name}.trace.jsonl")
    if "steady_round_s" in measured:
        measured["round_over_slowest"] = round(measured["steady_round_s"] / bare["slowest_s"], 2)
        measured["round_over_sum"] = round(measured["steady_round_s"] / bare["sum_s"], 2)
    return measured


def federation(overrides: list[str], out: Path, runtimes: Sequence[str] = tuple(FEDERATION_RUNTIMES),
               save: Callable[[dict], object] = lambda result: None) -> dict:
    """Where a federated round's time goes, both runtimes, one job (8 clients on the one device).

    ``round_over_slowest`` is the steady round's wall time over the slowest client's bare train +
    evaluate time: 1.0 would be a round that costs exactly its slowest client's work. On one device
    the clients share it, so ``round_over_sum`` (over all bare clients in sequence, what one GPU must
    compute) is the figure the fixed cost of a round shows in: 1.0 there is no overhead. The round
    includes the server's central evaluation of the official validation and test splits and the
    checkpoint write. ``hops`` says where the rest goes (``fedmeld.task.trace``). ``save`` gets the
    result after each runtime, so a run cut short by a time limit keeps the runtimes it finished."""
    from fedmeld.simulations.run import load_config
    from fedmeld.simulations.scaling import DEFAULTS
    from fedmeld.task.flower.waits import poll_seconds

    stamp = datetime.datetime.now().strftime("%H%M%S")
    default_runs = out.parent.resolve() / "fed-runs"
    job = [*DEFAULTS, "num-clients=8", "min-clients=8", "num-server-rounds=4", f'out="{default_runs}"', *overrides]
    cfg = load_config(None, job)  # the job as every runtime will read it: the last key=value wins
    bare = bare_clients(cfg)
    result = {"job": job, "poll_seconds": poll_seconds(), "bare_clients": bare}
    save(result)
    for runtime in runtimes:
        result[runtime] = measure_runtime(runtime, job, cfg, bare, f"{runtime}-{stamp}")
        save(result)
    return result


def environment(args: argparse.Namespace, rows: list[dict]) -> tuple[str, dict]:
    device = torch.device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    versions["hf_peft"] = next((r["hf_peft_version"] for r in rows if "hf_peft_version" in r), None)
    return hardware, versions


def ratio_table(rows: list[dict]) -> str:
    """Rows with img/s and peak memory relative to ``full`` of the same model, loop and compile
    setting, and (``x harness``) product rows relative to the eager harness row of their model and mode."""
    full = {(r["model"], r["loop"], r["compile"]): r for r in rows if r["mode"] == "full" and "img_per_s" in r}
    harness = {(r["model"], r["mode"]): r for r in rows if r["loop"] == "harness" and r["compile"] == "off"
               and "img_per_s" in r}
    lines = [f"{'model':<24} {'mode':<14} {'loop':<8} {'compile':<10} {'img/s':>9} {'x full':>7} {'x harness':>9} "
             f"{'peak GiB':>9} {'x full':>7} {'trainable':>11}"]
    for r in rows:
        head = f"{r['model']:<24} {r['mode']:<14} {r['loop']:<8} {r['compile']:<10}"
        if "img_per_s" not in r:
            lines.append(f"{head} {r['error']}")
            continue
        base, eager = full.get((r["model"], r["loop"], r["compile"])), harness.get((r["model"], r["mode"]))
        speed = f"{r['img_per_s'] / base['img_per_s']:.2f}" if base else "-"
        vs_harness = f"{r['img_per_s'] / eager['img_per_s']:.2f}" if eager and r["loop"] == "product" else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and r["peak_gib"] and base["peak_gib"] else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{head} {r['img_per_s']:>9.1f} {speed:>7} {vs_harness:>9} {peak:>9} {mem:>7} "
                     f"{r['trainable']:>11,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict], data: dict | None = None, fed: dict | None = None) -> dict:
        """Write the JSON so far: a run cut short by a time limit keeps its finished rows."""
        hardware, versions = environment(args, rows)
        result = {
            "hardware": hardware, "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: getattr(args, k) for k in ("batch", "img", "num_classes", "rank", "warmup", "steps",
                                                       "repeats", "device", "compile_mode")}
                        | {"loops": args.loops, "product_compile": args.product_compile, "data_flag": args.data_flag,
                           "harness": "bf16 autocast, AdamW (fused on CUDA), channels_last, synthetic data on the "
                                      "device",
                           "product": "task/engine.py train (bf16 autocast, the client's optimizer), the data_flag "
                                      "train split as uint8 28 px resized to img on the device"},
            "rows": rows,
            "data_path": data,
            "federation": fed,
        }
        out.write_text(json.dumps(result, indent=1) + "\n")
        return result

    profiles: dict[str, str] = {}
    rows = run_rows(args, profiles, save)
    data = data_path(args) if args.models or args.data_model else None
    result = save(rows, data)
    if args.federation is not None:
        result = save(rows, data, federation(args.federation, out, args.federation_runtimes,
                                             lambda fed: save(rows, data, fed)))
    if profiles:
        out.with_suffix(".profile.txt").write_text("".join(f"== {tag}\n{table}\n\n" for tag, table in profiles.items()))
    print(ratio_table(rows))
    if data:
        print(f"data path ({data['model']}, {data['mode']}, {data['flag']}): {data['medmnist_img_per_s']} vs "
              f"{data['synthetic_img_per_s']} img/s synthetic = {data['ratio']}x")
    if result["federation"]:
        print(json.dumps(result["federation"], indent=1))
    return result


if __name__ == "__main__":
    main()
