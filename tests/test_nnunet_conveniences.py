"""nnU-Net conveniences of fine-tuning: `--dataset`/`-d` by ID or name under $nnUNet_raw, and
`--resume_from_checkpoint true` picking the latest checkpoint as transformers' `get_last_checkpoint` does."""

from __future__ import annotations

import pytest

from meddinov3_hf.data.nnunet_ids import resolve_nnunet_dataset
from meddinov3_hf.finetuning.resume import resolve_resume_checkpoint


def test_dataset_id_and_name_resolve_through_nnunet_raw(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for name in ["Dataset001_Liver", "Dataset017_AMOS", "Dataset170_Other"]:
        (raw / name).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert resolve_nnunet_dataset("1") == raw / "Dataset001_Liver"
    assert resolve_nnunet_dataset("017") == raw / "Dataset017_AMOS"
    assert resolve_nnunet_dataset("Dataset170_Other") == raw / "Dataset170_Other"
    assert resolve_nnunet_dataset(str(raw / "Dataset017_AMOS")) == raw / "Dataset017_AMOS"  # a folder wins
    with pytest.raises(FileNotFoundError, match="no Dataset002_"):
        resolve_nnunet_dataset("2")
    with pytest.raises(FileNotFoundError, match="Dataset999_X: no such dataset"):
        resolve_nnunet_dataset("Dataset999_X")
    (raw / "Dataset001_Copy").mkdir()
    with pytest.raises(FileNotFoundError, match="several datasets with ID 001"):
        resolve_nnunet_dataset("1")
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(FileNotFoundError, match="needs the nnUNet_raw environment variable"):
        resolve_nnunet_dataset("17")


def test_resume_true_picks_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    for step in (2, 10, 9):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / "checkpoint-11.tmp").mkdir()  # not a checkpoint name
    assert resolve_resume_checkpoint("true", out) == str(out / "checkpoint-10")
    assert resolve_resume_checkpoint("True", out) == str(out / "checkpoint-10")
    assert resolve_resume_checkpoint("false", out) is None and resolve_resume_checkpoint(None, out) is None
    assert resolve_resume_checkpoint(str(out / "checkpoint-2"), out) == str(out / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        resolve_resume_checkpoint("true", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(out / "checkpoint-99"), out)


def test_finetune_cli_resolves_d_and_refuses_resume_without_checkpoints(tmp_path, monkeypatch, capsys):
    from meddinov3_hf.finetuning import run_finetune

    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "raw").mkdir()
    code = run_finetune(["-d", "5", "--model", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "no Dataset005_* folder in nnUNet_raw" in capsys.readouterr().err
    (tmp_path / "raw" / "Dataset005_X").mkdir()
    code = run_finetune(["-d", "5", "--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o"),
                         "--resume_from_checkpoint", "true"])  # fmt: skip
    assert code == 2 and "no checkpoint-N folder in --output_dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
