"""task/engine.py: the metrics match MedMNIST's Evaluator; FedProx keeps a client near the global model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medmnist import Evaluator

from fedmeld.peft import adapter_state
from fedmeld.task.config import RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import Inputs, medmnist_acc, medmnist_auc, pick_device, place, train
from fedmeld.task.model import build_model


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])
def test_acc_auc_match_medmnist_evaluator(medmnist_root, flag):
    info = task_info(flag)
    test = load_split(flag, "test", data_root=str(medmnist_root))
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(info.num_classes), size=len(test))
    scores[np.arange(len(test)), test.labels[:, 0].numpy()] += rng.random(len(test))  # better than chance
    expected_auc, expected_acc = Evaluator(flag, "test", root=str(medmnist_root)).evaluate(scores)
    assert medmnist_acc(test.labels.numpy(), scores, info) == pytest.approx(expected_acc, abs=1e-12)
    assert medmnist_auc(test.labels.numpy(), scores, info) == pytest.approx(expected_auc, abs=1e-12)
    assert 0.5 < expected_auc < 1.0


def test_fedprox_keeps_the_client_near_the_global_model(medmnist_root):
    info = task_info("breastmnist")
    data = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(torch.arange(128).numpy())
    drift = {}
    for mu in (0.0, 10.0):
        cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "norm", "data-root": str(medmnist_root)})
        model = build_model(cfg, info)
        start = adapter_state(model)
        train(model, data, info, epochs=2, batch_size=32, lr=0.05, weight_decay=0.0, device=pick_device("cpu"),
              seed=0, prox_mu=mu)
        end = adapter_state(model)
        drift[mu] = sum((end[k] - start[k]).pow(2).sum().item() for k in start if "running" not in k)
    assert drift[10.0] < 0.8 * drift[0.0]


def test_nearest_upsampling_replicates_pixels_as_medmnist_v2_does():
    """28 -> 224 with nearest: every pixel becomes an 8x8 block (PIL's NEAREST does the same)."""
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = Inputs(size=224, resize="nearest")(images, torch.device("cpu"))
    blocks = (images.float() / 127.5 - 1).repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert torch.equal(x, blocks)
    assert not torch.equal(Inputs(size=224, resize="bilinear")(images, torch.device("cpu")), blocks)


@pytest.mark.parametrize("augment", ["flip", "light"])
def test_augmentation_follows_its_seed_and_changes_the_images(augment):
    images = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    inputs, cpu = Inputs(augment=augment), torch.device("cpu")
    plain = Inputs()(images, cpu)
    first = inputs(images, cpu, torch.Generator().manual_seed(5))
    assert torch.equal(first, inputs(images, cpu, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, inputs(images, cpu, torch.Generator().manual_seed(6)))
    changed = [not torch.equal(a, b) for a, b in zip(first, plain)]
    assert 0 < sum(changed) <= 16 and torch.equal(inputs(images, cpu), plain)  # evaluation: never augmented
    if augment == "flip":  # each image is itself or its mirror image
        assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(first, plain))


def _pico(seed: int = 0):
    """A random-init vit_pico (fedmeld's CPU-sized ViT) with LoRA, dropout on its side path."""
    cfg = RunConfig.from_mapping({"model": "vit_pico_patch4_28", "peft": "lora", "lora-dropout": 0.2, "seed": seed})
    return build_model(cfg, task_info("breastmnist"))


def test_clients_training_in_threads_compute_what_they_compute_alone(medmnist_root):
    """The in-process backend trains clients in worker threads, and model init and CPU training draw
    from the process's global RNG: two trainings (dropout on) and a model build running at once give
    the same models and stats as one after another."""
    import threading

    info = task_info("breastmnist")
    data = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(np.arange(48))

    def run(seed: int, out: dict) -> None:
        model = _pico()
        stats = train(model, data, info, epochs=1, batch_size=16, lr=0.01, weight_decay=0.0,
                      device=pick_device("cpu"), seed=seed, inputs=Inputs(augment="light"))
        out[seed] = (stats["train_loss"], stats["train_accuracy"], adapter_state(model), adapter_state(_pico(seed)))

    alone: dict = {}
    for seed in (1, 2):
        run(seed, alone)
    together: dict = {}
    threads = [threading.Thread(target=run, args=(seed, together)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (1, 2):
        (*stats_a, state_a, init_a), (*stats_b, state_b, init_b) = alone[seed], together[seed]
        assert stats_a == stats_b
        assert all(torch.equal(state_a[k], state_b[k]) and torch.equal(init_a[k], init_b[k]) for k in state_a)
    assert alone[1][0] != alone[2][0]  # the seed matters: the comparison above is not vacuous


def test_training_reports_compile_time_and_refuses_cuda_graphs_on_the_cpu(medmnist_root):
    info = task_info("breastmnist")
    data = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(np.arange(40))
    model, cpu = _pico(), pick_device("cpu")
    stats = train(model, data, info, epochs=1, batch_size=16, lr=0.01, weight_decay=0.0, device=cpu, seed=0)
    assert stats["compile_seconds"] == 0.0 and stats["samples_seen"] == 40
    assert 0 < stats["train_loss"] and 0 <= stats["train_accuracy"] <= 1
    assert all(p.grad is None for p in model.parameters())  # gradients are freed after the call
    with pytest.raises(ValueError, match="compile=cudagraphs needs a CUDA device"):
        train(model, data, info, epochs=1, batch_size=16, lr=0.01, weight_decay=0.0, device=cpu, seed=0,
              compile_mode="cudagraphs")


def test_auc_of_a_diverged_model_is_nan_not_an_error(medmnist_root):
    """A poisoned federation can drive the global model to NaN; the server records that round."""
    info = task_info("breastmnist")
    labels = load_split("breastmnist", "test", data_root=str(medmnist_root)).labels.numpy()
    scores = np.full((len(labels), info.num_classes), np.nan)
    assert math.isnan(medmnist_auc(labels, scores, info))


def test_channels_last_placement_keeps_lte_conv_heads_and_the_outputs():
    """On CUDA the client's loop puts conv kernels channels_last; LTE's per-head conv factors are 5-D,
    which ``model.to(memory_format=torch.channels_last)`` refuses (every LTE client failed on the GPU)."""
    cfg = RunConfig.from_mapping({"model": "vit_pico_patch4_28", "peft": "lte", "lte-heads": 2, "lora-rank": 2})
    model = build_model(cfg, task_info("breastmnist")).train()
    factors = model.patch_embed.proj.lora_A  # (heads, rank, C, kh, kw)
    assert factors.dim() == 5
    with pytest.raises(RuntimeError, match="channels_last"):
        build_model(cfg, task_info("breastmnist")).to(memory_format=torch.channels_last)
    x = torch.randn(4, model.patch_embed.proj.in_channels, 28, 28)
    expected = model(x)
    place(model, torch.device("cpu"), channels_last=True)
    assert model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.patch_embed.proj.lora_A is factors and factors.is_contiguous()
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected)
