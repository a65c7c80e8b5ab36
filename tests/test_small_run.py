"""The small-run recipe of docs/quickstart.md ("Your own data on a CPU"), run as written at a smaller scale:
each command of its block, with flags appended that shrink it (20 images, 4 steps, 10 samples) and random Inception
weights (the real ones cannot be downloaded here), ends in a grid, an .npz and an FID line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainkit import ROOT, load_example, make_random_inception_weights

# Appended to each command of the recipe (argparse keeps the last value of a flag given twice).
SMALLER = {
    "examples/digits_folder.py": ["--per-class", "2"],
    "train.py": ["--max-steps", "4", "--global-batch-size", "8", "--sample-steps", "3"],
    "sample.py": ["--sampling-method", "euler", "--num-sampling-steps", "3"],
    "sample_ddp.py": ["--num-fid-samples", "10", "--per-proc-batch-size", "10", "--num-sampling-steps", "3"],
    "evaluate": ["--batch-size", "30", "--no-progress"],
}
# The command each script is a shim of (train.py, sample.py, sample_ddp.py: disploss.commands.main.run_command).
COMMAND = {"train.py": "train", "sample.py": "sample", "sample_ddp.py": "sample-ddp"}


def recipe() -> list[list[str]]:
    """The commands of the ```bash block after `<!-- recipe -->` in docs/quickstart.md, comments dropped."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    block = re.search(r"<!-- recipe -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "docs/quickstart.md has no bash block after <!-- recipe -->"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


def test_the_recipe_is_the_five_steps():
    steps = [cmd[1] if cmd[0] == "python" else " ".join(cmd[:2]) for cmd in recipe()]
    assert steps == ["examples/digits_folder.py", "train.py", "sample.py", "sample_ddp.py", "disploss evaluate"]


def test_the_recipe_runs_as_written_at_a_smaller_scale(tmp_path, capsys, monkeypatch):
    """Each command in this process, from a folder of its own (the scripts' shims are tested in test_cli.py).
    In the evaluate step scipy's sqrtm of the 2048 x 2048 covariance products is replaced by the diagonal of the
    square roots of their eigenvalues: the same trace, which is all FID takes from it, in 5 s instead of 25 s per
    product (the metrics are checked against scipy in test_evaluation.py; the command as written, unpatched, is
    timed in BENCHMARKS.md)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    import numpy as np

    from disploss.commands.main import main
    from disploss.evaluation import metrics

    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.diag(np.sqrt(np.linalg.eigvals(m).astype(complex))))
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths
    weights = make_random_inception_weights(tmp_path / "random-inception.pth")
    for cmd in recipe():
        cmd = [arg.replace("0001500.pt", "0000004.pt") for arg in cmd]  # the checkpoint of the last step
        if cmd[0] == "disploss":
            args = [str(weights) if a.startswith("weights-inception") else a for a in cmd[1:]]
            args = [str(p) for a in args for p in (sorted(Path().glob(a)) if "*" in a else [a])]
            capsys.readouterr()
            assert main([*args, *SMALLER["evaluate"]]) == 0
            evaluated = capsys.readouterr().out
        elif cmd[1] in COMMAND:
            assert main([COMMAND[cmd[1]], *cmd[2:], *SMALLER[cmd[1]]]) == 0, cmd
        else:
            assert load_example(Path(cmd[1]).stem).main([*cmd[2:], *SMALLER[cmd[1]]]) == 0
    run = Path("results/small/000-SiT-T-2-Linear-velocity-None")
    assert (run / "samples" / "0000004.png").is_file() and Path("samples/small.png").is_file()
    assert "preset demo" in (run / "log.txt").read_text()
    assert len(list(Path("samples/small").glob("*.npz"))) == 1 and Path("data/digits/reference.npz").is_file()
    fid = re.search(r"^FID: ([0-9.e+-]+)$", evaluated, re.M)
    assert fid and float(fid.group(1)) >= 0, evaluated


def test_no_flip_reaches_the_datasets(tmp_path):
    """--no-flip (the recipe's: a mirrored digit is not a digit) turns off the image folder's random flip."""
    from disploss.training import TrainConfig
    from disploss.training.loader import build_dataset
    from trainkit import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    assert build_dataset(TrainConfig(data_path=str(data), num_classes=2)).flip is True  # the reference's
    assert build_dataset(TrainConfig(data_path=str(data), num_classes=2, no_flip=True)).flip is False
