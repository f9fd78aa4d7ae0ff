import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.errors import ArtifactError
from nnsqueeze.plot import _act_ranges, plot_artifact, weight_histogram


def test_ranges_and_codes_closed_form():
    sd = {"a.weight": torch.tensor([[-63, 0], [5, 63]], dtype=torch.int8), "a.weight_scale_": torch.ones(2),
          "a.input_scale_": torch.tensor(0.5), "a.input_zero_point_": torch.tensor(10, dtype=torch.int32),
          "b.weight": torch.zeros(3)}
    assert _act_ranges(sd) == {"a": (-5.0, 122.5)}  # no scheme recorded: uint8 0..255
    info = {"type": "Linear", "weight_bits": 8, "scheme": {"bits": 8, "symmetric": True}}
    h = weight_histogram("static", info, {k[2:]: v for k, v in sd.items() if k.startswith("a.weight")})
    assert (h.qmin, h.qmax, h.clip) == (-128, 127, (-128, 127))
    want = torch.zeros(256, dtype=torch.int64)
    want[torch.tensor([-63, 0, 5, 63]) + 128] = 1
    assert torch.equal(h.counts, want)
    assert weight_histogram("static", info, {"weight": torch.zeros(2, 2)}) is None  # float: nothing to draw


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


# --- every quantized layer kind: histogram counts == the live model's codes ----------------------

import json  # noqa: E402

from torch import nn  # noqa: E402

from nnsqueeze.artifact import FORMAT_VERSION, MANIFEST, WEIGHTS, weights_bytes, write_dir  # noqa: E402
from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.isa import u8s8_saturates  # noqa: E402
from nnsqueeze.plot import weight_histograms  # noqa: E402
from nnsqueeze.registry import STEPS  # noqa: E402


class _Net(nn.Module):
    """Odd shapes on purpose: conv weight 7*3*3 = 63 codes (odd: a padding nibble when packed),
    Linear K = 33 (odd: the weight-only rows end in a padding nibble), an Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 11)
        self.conv = nn.Conv1d(3, 7, 3)
        self.fc1 = nn.Linear(33, 9)
        self.fc2 = nn.Linear(9, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)[:, :33]
        return self.fc2(torch.relu(self.fc1(h)))


def _calib():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 3, 7, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]


def _artifact(tmp_path, step_name, cfg):
    """Run one step on _Net (no export: fast) and write a minimal artifact directory."""
    torch.manual_seed(0)
    model = (_Decoder() if step_name == "rtn" else _Net()).eval()
    ctx = Context(calib_data=_calib(), progress=False)
    ctx.report.begin_step(step_name, {})
    step = STEPS.get(step_name)(STEPS.get(step_name).Config.model_validate(cfg))
    model = step.run(model, ctx).eval()
    manifest = {"format_version": FORMAT_VERSION, "steps": [{"name": step_name, "config": cfg,
                                                             "record": json.loads(json.dumps(step.record()))}]}
    out = write_dir(tmp_path / "art", {WEIGHTS: weights_bytes(model), MANIFEST: json.dumps(manifest),
                                       "report.json": json.dumps({"layers": ctx.report.layers})})
    return model, out


# 8-bit signed Linear codes: 7-bit where this CPU's ONNX Runtime u8s8 kernels saturate (reduce_range
# auto); embeddings are gathered, not multiplied, so they keep 8 bits everywhere.
# ("w8" in CASES keeps the test ids the same on every CPU.)
W8 = (-64, 63) if u8s8_saturates() else (-128, 127)

CASES = [  # (step, config, {layer: (kind, qmin, qmax)})
    ("quantize", {"weights": {"bits": 4}}, {"conv": (-8, 7), "fc1": (-8, 7), "fc2": (-8, 7)}),
    ("quantize", {"weights": {"bits": 3, "levels": "pow2"}}, None),
    ("quantize", {"weights": {"bits": 4, "levels": "nf4"}}, None),
    ("quantize", {"weights": {"bits": 4, "levels": "kmeans"}}, None),
    ("quantize", {"weights": {"bits": 8, "symmetric": False, "reduce_range": False}}, {"fc1": (0, 255)}),
    ("quantize", {"weights": {"bits": 2, "symmetric": False}}, {"fc1": (0, 3)}),
    pytest.param("quantize-dynamic", {"embeddings": True}, {"fc1": "w8", "emb": (-128, 127)},
                 marks=pytest.mark.ort_isa),
    ("weight-only", {"bits": 4, "group_size": 16}, {"fc1": (0, 15)}),
    ("weight-only", {"bits": 4, "group_size": 16, "symmetric": False}, {"fc1": (0, 15)}),
    ("weight-only", {"bits": 8, "group_size": 16}, {"fc1": (0, 255)}),
    ("rtn", {"bits": 4, "group_size": 16, "pack": True}, {"layers.0.fc": (0, 15)}),
    ("rtn", {"bits": 8, "group_size": None, "symmetric": False, "pack": True}, {"layers.0.fc": (0, 255)}),
]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(33, 33)

    def forward(self, x):
        return x + self.fc(x)


class _Decoder(nn.Module):
    """The layout the LLM steps (rtn/gptq/awq) walk: a ModuleList of identical blocks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


@pytest.mark.parametrize("step,cfg,ranges", CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_histogram_counts_equal_the_models_codes(tmp_path, step, cfg, ranges):
    model, out = _artifact(tmp_path, step, cfg)
    hists = weight_histograms(out)
    live = {n: m for n, m in model.named_modules() if hasattr(m, "weight_codes")}
    assert set(hists) == set(live) and hists  # every quantized layer gets a histogram
    for name, h in hists.items():
        mod = live[name]
        codes = mod.weight_codes().to(torch.int64).reshape(-1)  # the in-memory model, not the artifact
        levels = getattr(mod, "weight_levels_", None)
        if levels is not None and getattr(mod.wscheme, "levels", "uniform") != "uniform":
            assert torch.equal(h.counts, torch.bincount(codes, minlength=levels.numel()))
            assert torch.equal(h.levels, levels.float()) and h.clip == (float(levels.min()), float(levels.max()))
            continue
        n_weights = mod.weight.numel() if mod.weight.is_floating_point() else mod.in_features * mod.out_features
        assert codes.numel() == n_weights  # (PackedLinear keeps only packed codes as its weight)
        assert torch.equal(h.counts, torch.bincount(codes - h.qmin, minlength=h.qmax - h.qmin + 1))
        assert len(h.positions) == len(h.counts)
        if ranges and name in ranges:
            assert (h.qmin, h.qmax) == (W8 if ranges[name] == "w8" else ranges[name])
    plot_artifact(out)
    assert (out / "plots" / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_packed_odd_counts_and_weight_only_padding(tmp_path):
    model, out = _artifact(tmp_path, "weight-only", {"bits": 4, "group_size": 16})
    h = weight_histograms(out)["fc1"]
    assert int(h.counts.sum()) == 9 * 33 and h.counts[0] == 0 and h.clip == (1, 15)  # no padding counted
    model, out = _artifact(tmp_path / "b", "quantize", {"weights": {"bits": 4}})
    assert int(weight_histograms(out)["conv"].counts.sum()) == 7 * 3 * 3  # 63 codes in 32 bytes


@pytest.mark.parametrize("act,qr", [({}, (0, 255)), ({"bits": 16, "symmetric": True}, (-32768, 32767)),
                                    ({"bits": 4, "symmetric": True}, (-8, 7)), ({"bits": 6}, (0, 63))])
def test_activation_ranges_use_the_layers_format(tmp_path, act, qr):
    model, out = _artifact(tmp_path, "quantize", {"activations": act} if act else {})
    from safetensors.torch import load

    from nnsqueeze.plot import _act_schemes
    from nnsqueeze.artifact import read_manifest

    sd = load((out / WEIGHTS).read_bytes())
    ranges = _act_ranges(sd, _act_schemes(read_manifest(out)))
    assert set(ranges) == {"conv", "fc1", "fc2"}
    for name, (lo, hi) in ranges.items():
        mod = model.get_submodule(name)
        assert mod.act_qrange == qr
        s, z = float(mod.input_scale_), int(mod.input_zero_point_)
        assert (lo, hi) == ((qr[0] - z) * s, (qr[1] - z) * s)
    assert (plot_artifact(out)[0]).name == "activations.png"


@pytest.mark.parametrize("fmt,top", [("fp8-e4m3", 448.0), ("fp8-e5m2", 57344.0)])
def test_fp8_activation_ranges_are_symmetric_at_the_formats_max(tmp_path, fmt, top):
    model, out = _artifact(tmp_path, "quantize", {"weights": {"format": fmt}, "activations": {"format": fmt}})
    from safetensors.torch import load

    from nnsqueeze.artifact import read_manifest
    from nnsqueeze.plot import _act_schemes, _float_act_formats

    manifest = read_manifest(out)
    floats = _float_act_formats(manifest)
    assert floats == {"conv": fmt, "fc1": fmt, "fc2": fmt}
    ranges = _act_ranges(load((out / WEIGHTS).read_bytes()), _act_schemes(manifest), floats)
    for name, (lo, hi) in ranges.items():
        s = float(model.get_submodule(name).input_scale_)   # amax / max_finite
        assert (lo, hi) == (-top * s, top * s)                # i.e. +-amax, not uint8's [0, 255 s]
    assert (plot_artifact(out)[0]).name == "activations.png"


@pytest.mark.parametrize("bits", [4, 6])
def test_static_per_group_histogram_with_a_short_last_group(bits):
    """10 inputs in groups of 4 (4+4+2): the record's weight_shape says how rows split into groups."""
    from torch import nn

    from nnsqueeze.plot import weight_histogram
    from nnsqueeze.quant.modules import convert_
    from nnsqueeze.quant.scheme import WeightScheme

    torch.manual_seed(0)
    sch = WeightScheme(bits=bits, granularity="per-group", group_size=4)
    layer = convert_(nn.Linear(10, 3), weight_bits=bits, scheme=sch)
    st = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("weight")}
    layer.pack_state(st, "")
    info = {"scheme": sch.to_dict(), "weight_bits": bits, "weight_shape": [3, 10]}
    h = weight_histogram("static", info, st)
    qmin, qmax = layer.weight_qrange
    want = torch.bincount(layer.weight_codes().to(torch.int64).reshape(-1) - qmin, minlength=qmax - qmin + 1)
    assert torch.equal(h.counts, want) and int(h.counts.sum()) == 30


def test_replot_replaces_only_our_plots(tmp_path):
    model, out = _artifact(tmp_path, "quantize", {"weights": {"bits": 4}})
    plot_artifact(out)
    (out / "plots" / "weights.png").write_bytes(b"stale")
    (out / "plots" / "mine.txt").write_text("my notes")
    plot_artifact(out)  # a re-run replaces what plots.json lists and keeps the rest
    assert (out / "plots" / "weights.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plots" / "mine.txt").read_text() == "my notes"
    (out / "plots" / "plots.json").unlink()  # no index: nothing proves the folder is ours
    with pytest.raises(ArtifactError, match="not an nnsqueeze artifact"):
        plot_artifact(out)
    assert (out / "plots" / "mine.txt").read_text() == "my notes"


@pytest.mark.parametrize("damage, words", [
    (lambda out: (out / WEIGHTS).unlink(), r"model\.safetensors not found"),
    (lambda out: (out / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes()[:100]), "corrupt weights"),
    (lambda out: (out / MANIFEST).write_text((out / MANIFEST).read_text()[:20]), "corrupt manifest"),
    (lambda out: (out / "report.json").write_text("[1, 2]"), "corrupt report"),
    (lambda out: (out / "report.json").write_text("{\"layers"), "corrupt report"),
])
def test_plot_of_a_truncated_artifact_is_a_clear_error(tmp_path, damage, words):
    model, out = _artifact(tmp_path, "quantize", {"weights": {"bits": 4}})
    damage(out)
    with pytest.raises(ArtifactError, match=words):
        plot_artifact(out)
    assert not (out / "plots").exists()
