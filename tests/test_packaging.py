"""fedmeld installs beside Hugging Face peft: a non-editable install puts one top-level package,
``fedmeld``, into site-packages, and one Python process uses HF peft's LoRA and fedmeld's adapters."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

SOURCES = ("pyproject.toml", "README.md", "peft", "task", "client", "server", "simulations")

BOTH_IN_ONE_PROCESS = '''
import sys
from pathlib import Path

import peft
import timm
import torch
from peft import LoraConfig, get_peft_model

import fedmeld.peft
from fedmeld.peft import PeftConfig, apply_peft

site = Path(sys.argv[1]).resolve()
assert Path(fedmeld.peft.__file__).resolve().is_relative_to(site), fedmeld.peft.__file__  # the wheel, not the checkout
assert not Path(peft.__file__).resolve().is_relative_to(site), peft.__file__  # HF peft, untouched
x = torch.randn(2, 3, 32, 32)
theirs = get_peft_model(timm.create_model("resnet10t", num_classes=2),
                        LoraConfig(r=4, lora_alpha=8, target_modules=r".*layer\\d\\.\\d\\.conv[12]"))
ours = apply_peft(timm.create_model("resnet10t", num_classes=2), PeftConfig(method="lora+head", lora_rank=4))
print("hf", tuple(theirs(x).shape), peft.__version__)
print("fedmeld", tuple(ours(x).shape), sum(p.requires_grad for p in ours.parameters()))
'''


def test_a_wheel_installs_beside_hugging_face_peft(tmp_path, repo):
    pytest.importorskip("peft", reason="Hugging Face peft is a test dependency (pip install -e '.[test]')")
    import peft as hf_peft

    assert hasattr(hf_peft, "LoraConfig"), f"`import peft` found {hf_peft.__file__}, not Hugging Face peft"
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy2
        copy(repo / name, source / name, **({"ignore": shutil.ignore_patterns("results", "__pycache__")}
                                            if (repo / name).is_dir() else {}))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("fedmeld-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"fedmeld", wheel.name.split("-py3")[0] + ".dist-info"}  # no peft/, client/, server/ ...

    env = tmp_path / "fresh"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # torch, timm, flwr and HF peft come from this test's environment, after the fresh site-packages
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                                "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert not (site / "peft").exists() and (site / "fedmeld" / "peft" / "lora.py").is_file()

    (tmp_path / "both.py").write_text(BOTH_IN_ONE_PROCESS)
    ran = subprocess.run([python, str(tmp_path / "both.py"), str(site)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    hf_line, ours_line = ran.stdout.strip().splitlines()[-2:]
    assert hf_line.startswith("hf (2, 2) ") and ours_line.startswith("fedmeld (2, 2) ")
    assert int(ours_line.split()[-1]) > 2  # LoRA factors and the classifier train
