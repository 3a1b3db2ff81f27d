"""MiniMind .pth exports and --from_weight (issue 26): atomic with a blake2b sidecar, finite
after the fp16 cast, and a corrupt or truncated file is an error naming the file (not the
flags); MiniMind's own files (no sidecar) still load."""
import errno
import os

import pytest
import torch

from latentfast import files
from latentfast.models.minimind import MiniMindConfig, MiniMindForCausalLM, load_pth, save_pth
from latentfast.train.minimind.full_sft import FullSFT, FullSFTArgs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, num_hidden_layers=1, max_seq_len=48, batch_size=4, accumulation_steps=1, log_interval=0,
            save_interval=0, max_steps=2, dtype="float32", device="cpu", data_path="demo")


def _lm(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1))


def _flip(path, n=10):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def _sft(tmp_path):
    cfg = FullSFTArgs.from_dict({**TINY, "save_dir": str(tmp_path / "out"), "from_weight": "pretrain"})
    t = FullSFT(cfg)
    t.device, t.rank, t.world = torch.device("cpu"), 0, 1
    return t


def test_export_round_trips_with_a_sidecar(tmp_path):
    path = save_pth(_lm(), tmp_path / "out" / "pretrain_32.pth")
    assert files.sidecar(path).is_file() and files.verify_sidecar(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    lm = _sft(tmp_path).init_lm("pretrain")
    ref = _lm()
    assert all(torch.equal(a.half(), b.half()) for a, b in zip(lm.state_dict().values(), ref.state_dict().values()))


def test_flipped_bytes_in_a_pth_fail_naming_the_file(tmp_path):
    path = save_pth(_lm(), tmp_path / "out" / "pretrain_32.pth")
    _flip(path)
    with pytest.raises(files.CorruptFileError, match=r"--from_weight: .*pretrain_32\.pth: contents differ"):
        _sft(tmp_path).init_lm("pretrain")


def test_truncated_pth_is_named_not_blamed_on_the_flags(tmp_path):
    path = save_pth(_lm(), tmp_path / "out" / "pretrain_32.pth")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(files.CorruptFileError, match=r"pretrain_32\.pth: 5000 bytes") as e:
        _sft(tmp_path).init_lm("pretrain")
    assert "--hidden_size" not in str(e.value)
    files.sidecar(path).unlink()  # no sidecar: torch's own error, still naming the file
    with pytest.raises(files.CorruptFileError, match=r"pretrain_32\.pth: not a readable \.pth"):
        _sft(tmp_path).init_lm("pretrain")


def test_a_pth_without_sidecar_loads(tmp_path):
    """MiniMind's own weights come without our sidecar."""
    path = tmp_path / "out" / "pretrain_32.pth"
    path.parent.mkdir()
    torch.save({f"module.{k}": v.half() for k, v in _lm(3).state_dict().items()}, path)
    lm = _sft(tmp_path).init_lm("pretrain")
    assert torch.equal(lm.model.embed_tokens.weight, _lm(3).model.embed_tokens.weight.half().float())


def test_fp16_overflow_is_an_error_naming_tensor_and_dtype_and_writes_nothing(tmp_path):
    lm = _lm()
    old = save_pth(lm, tmp_path / "w.pth")
    before = old.read_bytes()
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(files.NonFiniteWeightError, match=r"model\.layers\.0\.mlp\.up_proj\.weight \(float16: 1 "):
        save_pth(lm, tmp_path / "w.pth")
    assert old.read_bytes() == before and files.verify_sidecar(old)
    with pytest.raises(files.NonFiniteWeightError):
        save_pth(lm, tmp_path / "new.pth")
    assert not (tmp_path / "new.pth").exists()
    save_pth(lm, tmp_path / "w32.pth", dtype=torch.float32)  # fp32 holds it


def test_nonfinite_pth_from_elsewhere_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    sd = {k: v.half() for k, v in _lm().state_dict().items()}
    sd["lm_head.weight"][0, 0] = float("inf")
    torch.save(sd, path)
    with pytest.raises(files.CorruptFileError, match=r"refusing to load .*bad\.pth: lm_head\.weight"):
        load_pth(_lm(), path)


def test_full_disk_between_sidecar_and_rename_keeps_the_old_file_loadable(tmp_path, monkeypatch):
    path = save_pth(_lm(1), tmp_path / "w.pth")
    real = os.replace

    def enospc(src, dst):
        if str(dst).endswith("w.pth"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", enospc)
    for seed in (2, 3):  # cut twice in a row: the sidecar still lists what is on disk
        with pytest.raises(OSError):
            save_pth(_lm(seed), path)
    monkeypatch.setattr(os, "replace", real)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    lm = _lm(5)
    load_pth(lm, path)  # the old file, verified against a sidecar that lists both
    assert torch.equal(lm.lm_head.weight, _lm(1).lm_head.weight.half().float())
    save_pth(_lm(2), path)
    assert len(__import__("json").loads(files.sidecar(path).read_text())["blake2b"]) == 1


def test_stage_removes_its_stale_export_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".full_sft_32.pth{files.TMP_TAG}12345"
    other = out / f".pretrain_32.pth{files.TMP_TAG}12345"  # another stage's file: not ours to remove
    stale.write_bytes(b"half")
    other.write_bytes(b"half")
    cfg = FullSFTArgs.from_dict({**TINY, "save_dir": str(out)})
    t = FullSFT(cfg)
    t.device, t.rank, t.world = torch.device("cpu"), 0, 1
    t.setup()
    assert not stale.exists() and other.exists()
