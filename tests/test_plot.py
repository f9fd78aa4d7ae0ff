import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.errors import ArtifactError
from nnsqueeze.plot import _act_ranges, _weight_codes, plot_artifact


def test_ranges_and_codes_closed_form():
    sd = {"a.weight": torch.tensor([[-63, 0], [5, 63]], dtype=torch.int8), "a.weight_scale_": torch.ones(2),
          "a.input_scale_": torch.tensor(0.5), "a.input_zero_point_": torch.tensor(10, dtype=torch.int32),
          "b.weight": torch.zeros(3)}
    assert _act_ranges(sd) == {"a": (-5.0, 122.5)}
    codes = _weight_codes(sd)
    assert list(codes) == ["a"] and codes["a"][1] == 63 and codes["a"][0].tolist() == [-63, 0, 5, 63]


def test_plot_artifact_writes_pngs_and_can_rerun(tiny_cnn, toy_data, tmp_path):
    r = nsq.compress(tiny_cnn, {"steps": [{"prune": {"sparsity": 0.5}}, {"quantize": {}}],
                                "evaluate": {"runs": 2, "warmup": 0}},
                     calib_data=toy_data["calib"], eval_data=toy_data["eval"], progress=False)
    out = r.save(tmp_path / "art")
    for _ in range(2):  # a second run replaces the first atomically
        paths = plot_artifact(out)
    assert sorted(p.name for p in paths) == ["activations.png", "layers.png", "weights.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ArtifactError, match="not found"):
        plot_artifact(tmp_path / "missing")
