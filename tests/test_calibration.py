import pytest
import torch

from hf_vq.pipeline.data import CalibrationError, build_calibration, sample_windows

from tests.conftest import random_text


def test_list_of_strings_gives_seeded_windows(tiny_tokenizer):
    texts = [random_text(300, s) for s in range(3)]
    a = build_calibration(texts, tiny_tokenizer, num_samples=5, seq_len=40, seed=3)
    b = build_calibration(texts, tiny_tokenizer, num_samples=5, seq_len=40, seed=3)
    c = build_calibration(texts, tiny_tokenizer, num_samples=5, seq_len=40, seed=4)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_windows_are_contiguous_slices():
    ids = torch.arange(1000)
    w = sample_windows(ids, 4, 50, seed=0)
    assert ((w[:, 1:] - w[:, :-1]) == 1).all()


def test_file_and_folder(tiny_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(random_text(200, 1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(random_text(200, 2))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    one = build_calibration(str(tmp_path / "a.txt"), tiny_tokenizer, num_samples=2, seq_len=50)
    both = build_calibration(tmp_path, tiny_tokenizer, num_samples=2, seq_len=300)
    assert one.shape == (2, 50) and both.shape == (2, 300)


def test_datasets_text_builder_with_local_file(tiny_tokenizer, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(random_text(30, s) for s in range(20)))
    # the `datasets` loader path, with the "text" builder reading a local file instead of a Hub dataset
    from hf_vq.pipeline.data import load_dataset_texts

    texts = load_dataset_texts("text", None, "train", "text", data_files=str(f))
    assert len(texts) == 20
    ids = build_calibration(texts, tiny_tokenizer, num_samples=3, seq_len=64)
    assert ids.shape == (3, 64)


def test_pretokenized_tensors_and_dataloader():
    t = torch.randint(0, 50, (6, 16))
    assert torch.equal(build_calibration(t), t)
    assert torch.equal(build_calibration([t[0], t[1]]), t[:2])
    assert torch.equal(build_calibration([{"input_ids": t[:3]}]), t[:3])
    dl = torch.utils.data.DataLoader(t, batch_size=4)
    assert torch.equal(build_calibration(dl), t)


def test_errors_are_explicit(tiny_tokenizer, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the Hub
    with pytest.raises(CalibrationError, match="too small: .* tokens, need at least seq_len=5000"):
        build_calibration(["the a of"], tiny_tokenizer, num_samples=1, seq_len=5000)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        build_calibration(["some text"], None, model_path=None)
    with pytest.raises(CalibrationError, match="does not exist"):
        build_calibration(str(tmp_path / "nope.txt"), tiny_tokenizer)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf8")
    with pytest.raises(CalibrationError, match="cannot read"):
        build_calibration(str(bad), tiny_tokenizer)
    with pytest.raises(CalibrationError, match="share one length"):
        build_calibration([torch.zeros(4), torch.zeros(5)])
    with pytest.raises(CalibrationError, match="needs calibration data"):
        build_calibration(None)
    with pytest.raises(CalibrationError, match="could not load dataset"):
        build_calibration("no_such_builder_xyz", tiny_tokenizer)


def test_overlapping_windows_warn(tiny_tokenizer):
    with pytest.warns(UserWarning, match="windows will overlap"):
        build_calibration([random_text(100)], tiny_tokenizer, num_samples=10, seq_len=50)
