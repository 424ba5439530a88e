"""Start-up and CLI polish: peft-free inference loading (same outputs), --version, --threads,
descriptions and examples in every subcommand's help, info -q."""

import os
import subprocess
import sys

import pytest
import torch

import pyratok
from pyratok.cli import build_parser, main
from pyratok.io import save_tokens
from pyratok.models.pyratok import PyraTok, PyraTokConfig


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    """A tiny model with LoRA adapters whose B is not zero (so the adapters change the output)."""
    path = tmp_path_factory.mktemp("model") / "tiny_lora"
    torch.manual_seed(0)
    model = PyraTok(PyraTokConfig.tiny(text_encoder=None, lora_rank=2, lora_alpha=4.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return str(path)


def test_inference_load_gives_the_same_outputs_without_peft(lora_model_dir):
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = PyraTok.from_pretrained(lora_model_dir).eval()
    light = PyraTok.from_pretrained(lora_model_dir, inference=True).eval()
    with torch.no_grad():
        want, got = full.vae.encoder_features(video), light.vae.encoder_features(video)
        with full._adapters_off():  # the adapters matter, so the comparison below means something
            bare = full.vae.encoder_features(video)
    assert not torch.equal(bare[0].mean, want[0].mean)
    assert torch.equal(got[0].mean, want[0].mean)
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    a, b = full.encode(video), light.encode(video)
    assert all(torch.equal(i, j) for i, j in zip(a.ids, b.ids)) and a.model_id == b.model_id
    assert torch.equal(full.decode(a), light.decode(b))


def test_cli_model_load_imports_neither_peft_nor_transformers(lora_model_dir):
    code = ("import sys; from pyratok.cli import _load_model; _load_model(sys.argv[1], 'cpu'); "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, lora_model_dir], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"pyratok {pyratok.__version__}"


def test_every_subcommand_has_a_description_and_examples():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description and len(p.description) > 40, name
        assert "examples:" in text and f"pyratok {name}" in text.split("examples:")[1], name


@pytest.fixture(scope="module")
def token_file(lora_model_dir, tmp_path_factory):
    model = PyraTok.from_pretrained(lora_model_dir, inference=True).eval()
    with torch.no_grad():
        tokens = model.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    path = str(tmp_path_factory.mktemp("tok") / "t.safetensors")
    save_tokens(path, tokens)
    return path


def test_info_quiet_prints_nothing(token_file, tmp_path, capsys):
    assert main(["info", token_file, "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["info", token_file]) == 0 and "tokens" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a token file")
    assert main(["info", str(bad), "-q"]) == 2  # -q silences output, not errors


def test_threads_option(token_file):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "info", token_file, "-q"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["--threads", "0", "info", token_file])


def test_cli_sets_passive_openmp_waiting_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY when torch loads it: the CLI module must set it first."""
    code = ("import os, sys; import pyratok.cli; "
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.stdout.split() == ["False", "PASSIVE"], res.stderr
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert res.stdout.split() == ["False", "ACTIVE"], res.stderr
