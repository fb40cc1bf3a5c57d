import json

import torch

from vdopt.reference.model import load_reference
from vdopt.reference.train import main


def test_train_writes_weights_and_resumes(tmp_path):
    main(["--out", str(tmp_path), "--steps", "2", "--batch", "2", "--threads", "1"])
    assert json.loads((tmp_path / "train_log.json").read_text())["step"] == 2
    t1, _ = load_reference(tmp_path)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # resuming reads it the same way: plain data only
    assert ck["step"] == 2 and ck["elapsed"] > 0
    # running again resumes from the checkpoint instead of starting over
    main(["--out", str(tmp_path), "--steps", "3", "--batch", "2", "--threads", "1"])
    assert json.loads((tmp_path / "train_log.json").read_text())["step"] == 3
    t2, c2 = load_reference(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["training"]["steps"] == 3
    changed = any(not torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    assert changed
