"""`meddinov3 convert REPO_ID OUT` and `--push-to-hub` (issue 9) against a local stand-in for the Hub: a real HTTP
server on 127.0.0.1 (tests/hub_standin.py) behind huggingface_hub's own download/upload code, plus its real cache
directory for the offline cases. Nothing of this package is mocked; the endpoint, cache folder and offline switch
are set in `huggingface_hub.constants`, which is where the HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE
environment variables end up. The remote-code load runs in a subprocess in which `meddinov3_hf` cannot be imported.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE_IMPORT, reference_dinov3, release_checkpoint, tiny_config
from hub_standin import HubStandIn
from huggingface_hub import constants
from safetensors.torch import load_file

from meddinov3_hf import MedDINOv3Model
from meddinov3_hf.cli import main as cli_main

RELEASE = "ricklisz123/MedDINOv3-ViTB-16-CT-3M"
DINOV3 = "facebook/dinov3-vitb16-pretrain-lvd1689m"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in Hub with a release-format repo, a sharded transformers DINOv3 repo and a repo with neither."""
    root = tmp_path_factory.mktemp("hub")
    release_reference, checkpoint = release_checkpoint(tiny_config(layer_norm_eps=1e-6), seed=3)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    dinov3_reference = reference_dinov3(tiny_config(), seed=4)
    dinov3_reference.save_pretrained(root / "dinov3", max_shard_size="40KB")
    assert (root / "dinov3" / "model.safetensors.index.json").is_file()  # the sharded layout is exercised
    with HubStandIn() as server:
        server.release_commit = server.add_repo(
            RELEASE, {"model.pth": buffer.getvalue(), "README.md": b"# release"}
        )
        server.dinov3_commit = server.add_folder(DINOV3, root / "dinov3")
        server.add_repo("someone/no-checkpoint", {"README.md": b"# nothing here"})
        server.release_reference, server.release_teacher = release_reference, checkpoint["teacher"]
        server.dinov3_reference = dinov3_reference
        yield server


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in, with a fresh cache; the working directory is a fresh folder."""
    cache = tmp_path / "hf-cache"
    _set_endpoint(monkeypatch, hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def _set_endpoint(monkeypatch, url: str) -> None:
    # What HF_ENDPOINT sets when huggingface_hub is imported.
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def _go_offline(monkeypatch) -> None:
    # The endpoint points at a closed port as well: offline must not even try the network.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _set_endpoint(monkeypatch, "http://127.0.0.1:9")


def _hidden(model, x):
    with torch.no_grad():
        return model.eval()(x).last_hidden_state


def test_release_repo_converts_keeping_heads_and_card_names_the_source(hub, online, capsys):
    # The README's "Get the weights" command, verbatim.
    assert cli_main(["convert", RELEASE, "meddinov3-vitb", "--rope-precision", "fp32"]) == 0
    out = Path("meddinov3-vitb")
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(
        _hidden(MedDINOv3Model.from_pretrained(out), x), _hidden(hub.release_reference, x), atol=1e-5, rtol=0
    )
    heads = load_file(out / "pretraining_heads.safetensors")
    expected = {k: v for k, v in hub.release_teacher.items() if k.startswith(("dino_head.", "ibot_head."))}
    assert sorted(heads) == sorted(expected) and all(torch.equal(heads[k], expected[k]) for k in expected)
    assert {"dino_head.mlp.0.weight", "dino_head.mlp.4.bias", "ibot_head.last_layer.weight"} <= set(heads)
    card = (out / "README.md").read_text()
    assert RELEASE in card and hub.release_commit in card and "`model.pth`" in card
    assert "Conversion check" in card and "0 missing, 0 unexpected" in card
    assert "pretraining-head tensors kept" in capsys.readouterr().out
    # Downloaded through huggingface_hub's normal cache layout.
    assert list((online / "models--ricklisz123--MedDINOv3-ViTB-16-CT-3M" / "snapshots").glob("*/model.pth"))


def test_dinov3_transformers_repo_converts_exactly_at_a_revision(hub, online):
    # The README's second command, verbatim, then pinned to the commit.
    assert cli_main(["convert", DINOV3, "dinov3-vitb16"]) == 0
    assert cli_main(["convert", DINOV3, "pinned", "--revision", hub.dinov3_commit]) == 0
    x = torch.randn(2, 3, 48, 32)
    for out in ("dinov3-vitb16", "pinned"):
        model = MedDINOv3Model.from_pretrained(out)
        torch.testing.assert_close(_hidden(model, x), _hidden(hub.dinov3_reference, x), atol=1e-5, rtol=0)
        card = Path(out, "README.md").read_text()
        assert DINOV3 in card and hub.dinov3_commit in card and "model.safetensors.index.json" in card
        assert "matches the source checkpoint loaded as transformers' `DINOv3ViTModel`" in card
        assert not Path(out, "pretraining_heads.safetensors").exists()


def test_offline_cached_repo_converts_and_uncached_fails_in_one_line(hub, online, monkeypatch, capsys):
    assert cli_main(["convert", RELEASE, "first"]) == 0  # fills the cache
    _go_offline(monkeypatch)
    assert cli_main(["convert", RELEASE, "again"]) == 0
    assert Path("again/model.safetensors").is_file()
    capsys.readouterr()
    assert cli_main(["convert", DINOV3, "never"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "not in the Hugging Face cache" in err and f"hf download {DINOV3}" in err
    assert not Path("never").exists() and sorted(os.listdir(".")) == ["again", "first"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["someone/no-checkpoint", "out"], "neither config.json"),
        (["someone/missing-repo", "out"], "no such repo"),
        ([RELEASE, "out", "--revision", "v9"], "no revision 'v9'"),
        ([RELEASE, "out", "--filename", "teacher.pth"], "no file 'teacher.pth'"),
    ],
)
def test_bad_hub_sources_fail_in_one_line_writing_nothing(hub, online, capsys, argv, message):
    assert cli_main(["convert", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert os.listdir(".") == []


@pytest.mark.slow
def test_push_to_hub_then_load_with_remote_code_without_the_package(hub, online, tmp_path):
    """Convert + push to the stand-in, then `AutoModel` / `AutoModelForSemanticSegmentation` /
    `AutoImageProcessor` from the pushed repo with trust_remote_code=True, in a Python that cannot import
    meddinov3_hf, through the same endpoint."""
    assert cli_main(["convert", RELEASE, "converted", "--push-to-hub", "me/meddinov3-tiny"]) == 0
    assert hub.created[-1]["organization"] == "me" and hub.created[-1]["name"] == "meddinov3-tiny"
    pushed = hub.repos["me/meddinov3-tiny"]["files"]
    local = {p.name for p in Path("converted").iterdir()}
    assert set(pushed) == local
    assert {"modeling_meddinov3.py", "configuration_meddinov3.py", "pretraining_heads.safetensors"} <= local
    assert pushed["model.safetensors"] == Path("converted/model.safetensors").read_bytes()
    assert b"me/meddinov3-tiny" in pushed["README.md"] and RELEASE.encode() in pushed["README.md"]
    auto_map = json.loads(pushed["config.json"])["auto_map"]
    assert auto_map["AutoModel"] == "modeling_meddinov3.MedDINOv3Model"

    x = torch.randn(1, 1, 32, 32)
    expected = _hidden(MedDINOv3Model.from_pretrained("converted"), x)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = BLOCK_PACKAGE_IMPORT + textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModel
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        model = AutoModel.from_pretrained("me/meddinov3-tiny", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]).last_hidden_state, io["expected"], atol=0, rtol=0)
        processor = AutoImageProcessor.from_pretrained("me/meddinov3-tiny", trust_remote_code=True)
        assert processor(np.full((32, 32), -1000, np.int16))["pixel_values"].shape == (1, 1, 32, 32)
        print("REMOTE-OK", type(model).__name__)
        """
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(tmp_path / "remote-cache"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0 and "REMOTE-OK MedDINOv3Model" in result.stdout, result.stderr[-3000:]


def test_a_missing_local_checkpoint_is_not_taken_for_a_repo_id(tmp_path, monkeypatch, capsys):
    from meddinov3_hf.hub import is_hub_repo_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_repo_id(RELEASE) and is_hub_repo_id(DINOV3)
    assert not is_hub_repo_id("dir/ckpt.pth") and not is_hub_repo_id("model.pth")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not is_hub_repo_id("owner/name")  # an existing local folder wins
    assert cli_main(["convert", "dir/ckpt.pth", "out"]) != 0
    assert "no such file" in capsys.readouterr().err


def test_push_command_publishes_a_finetuned_folder_that_loads_back(hub, online, tmp_path, capsys):
    # `meddinov3 push DIR REPO` (the retry for a failed `finetune --push_to_hub`) through huggingface_hub's real
    # whoami, create_repo and create_commit, then loaded back from the stand-in by repo id.
    from transformers import AutoModelForSemanticSegmentation

    from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor

    folder = tmp_path / "finetuned"
    torch.manual_seed(0)
    model = MedDINOv3ForSemanticSegmentation(tiny_config()).eval()
    model.save_pretrained(folder)
    MedDINOv3ImageProcessor().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "checkpoint-6").mkdir()  # trainer state stays local
    (folder / "checkpoint-6" / "optimizer.pt").write_bytes(b"x")

    assert cli_main(["push", str(folder), "me/tiny-seg"]) == 0
    assert "pushed" in capsys.readouterr().out
    files = hub.repos["me/tiny-seg"]["files"]
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert {"config.json", "preprocessor_config.json", "README.md", "modeling_meddinov3.py"} <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    loaded = AutoModelForSemanticSegmentation.from_pretrained("me/tiny-seg").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_push_command_without_a_token_fails_before_uploading(hub, online, tmp_path, monkeypatch, capsys):
    from meddinov3_hf import MedDINOv3ForSemanticSegmentation, MedDINOv3ImageProcessor

    folder = tmp_path / "finetuned"
    MedDINOv3ForSemanticSegmentation(tiny_config()).save_pretrained(folder)
    MedDINOv3ImageProcessor().save_pretrained(folder)
    (folder / "README.md").write_text("# tiny\n")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    commits_before = [r for r in hub.requests if "/commit/" in r[1]]
    assert cli_main(["push", str(folder), "me/never"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "me/never" in err
    assert "me/never" not in hub.repos and [r for r in hub.requests if "/commit/" in r[1]] == commits_before
