"""The ``visar train`` launcher: one process in-process, two CPU processes through accelerate launch (gloo).

Two processes with the same global batch must make the same parameter update as one process.
"""
import json

import pytest
import torch
import yaml

from visar.train import checkpoint as ckpt
from visar.train.launch import accelerate_command, main
from visar.utils.io import load_safetensors

CFG = {
    "task": "classifier",
    "model": {"cls": "visar.eval.classifier:ShapesClassifier", "kwargs": {"widths": [8, 8], "image_size": 16, "groups": 4}},
    "data": {"kind": "shapes", "size": 16, "length": 256},
    "optim": {"lr": 1e-2, "warmup_steps": 0, "grad_clip": 1.0},
    "train": {"steps": 2, "batch_size": 8, "save_every": 0, "log_every": 1, "progress": False, "threads": 1},
}


def _weights(out):
    d = ckpt.find_latest(out / "checkpoints")
    return json.loads((d / "meta.json").read_text()), load_safetensors(d / "model.safetensors")


@pytest.mark.parametrize("frozen_body", [False, True], ids=["all", "head-only"])
def test_one_and_two_processes_make_the_same_update(tmp_path, frozen_body):
    cfg = tmp_path / "cls.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["model.trainable=[head]"] if frozen_body else []  # DDP with frozen parameters
    assert main([str(cfg), f"train.output_dir={one}", *extra]) == 0
    assert main([str(cfg), "--num-processes", "2", f"train.output_dir={two}", *extra]) == 0
    (meta1, w1), (meta2, w2) = _weights(one), _weights(two)
    assert meta1["num_processes"] == 1 and meta2["num_processes"] == 2  # two processes really ran
    assert meta2["step"] == 2
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (two / "export" / "classifier.safetensors").is_file()
    if frozen_body:  # same seed, same init: the frozen body is the untouched initialisation
        from visar.eval.classifier import ShapesClassifier

        torch.manual_seed(0)  # the trainer's train.seed
        init = ShapesClassifier(**CFG["model"]["kwargs"]).state_dict()
        body = [k for k in w2 if k.startswith("body.") and w2[k].is_floating_point()]
        assert body and all(torch.equal(w2[k], init[k]) for k in body)
        assert not torch.equal(w2["head.weight"], init["head.weight"])


def test_accelerate_command_cpu_recipe():
    cmd, env = accelerate_command("c.yaml", ["train.steps=3"], 2, None, 12345, cuda=False)
    assert env["ACCELERATE_USE_CPU"] == "1"
    s = " ".join(cmd)
    assert "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no" in s
    assert s.endswith("-m visar.train.launch --worker c.yaml train.steps=3")
    cmd, env = accelerate_command("c.yaml", [], None, "fsdp.yaml", 12345, cuda=True)
    assert cmd[cmd.index("--config_file") + 1] == "fsdp.yaml" and "ACCELERATE_USE_CPU" not in env or \
        env.get("ACCELERATE_USE_CPU") == __import__("os").environ.get("ACCELERATE_USE_CPU")


def test_launcher_rejects_bad_process_counts(tmp_path):
    cfg = tmp_path / "cls.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    assert main([str(cfg), "--num-processes", "3"]) == 2  # 8 rows do not split over 3 processes
    assert main([str(cfg), "--accelerate-config", str(tmp_path / "none.yaml"), "--num-processes", "2"]) == 2
    with pytest.raises(SystemExit):
        main([])
