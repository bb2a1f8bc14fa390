"""Every entry script prints a usage error (a LlamaJaxError) as one line naming the fix, exit status 1, no
traceback; --traceback shows the stack."""

import pytest

from tests.helpers import run_module


@pytest.mark.parametrize(
    "args, message",
    [
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.optimizer.lr=-1"],
         "train: invalid optimizer: optimizer.lr=-1.0 must be >= 0"),
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.optimizer.lrr=1"],
         'train: no such config field \'lrr\' (in --config.optimizer.lrr). Did you mean "lr" instead of "lrr"?'),
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.data.manual_dir={tmp}",
          "--config.optimizer.lrr=1"],  # only the unknown flag is named
         "train: no such config field 'lrr' (in --config.optimizer.lrr). Did you mean"),
        (["experiments.sample", "--workdir={tmp}/missing"], "sample: workdir {tmp}/missing does not exist"),
        (["experiments.eval_ppl", "--workdir={tmp}/missing"], "eval_ppl: workdir {tmp}/missing does not exist"),
        (["experiments.convert_hf", "--hf_dir={tmp}/nohf", "--workdir={tmp}/w"], "convert_hf: {tmp}/nohf/config.json"),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else "",
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    r = run_module(*[a.format(tmp=tmp_path) for a in args], timeout=120)
    assert r.returncode == 1, r.stderr
    assert message.format(tmp=tmp_path) in r.stderr
    assert "Traceback" not in r.stderr


def test_traceback_flag_shows_the_stack(tmp_path):
    r = run_module("experiments.sample", f"--workdir={tmp_path}/missing", "--traceback", timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr
