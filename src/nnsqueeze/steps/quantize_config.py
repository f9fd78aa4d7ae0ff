"""The ``quantize`` step's configuration: weights, activations, calibration, equalization and
AdaRound options (validated with pydantic, ``extra="forbid"``), and their conversion to the schemes
the quantized layers use. The step itself is :mod:`nnsqueeze.steps.quantize`.

    >>> from nnsqueeze.steps.quantize_config import QuantizeConfig, weight_scheme
    >>> cfg = QuantizeConfig(weights={"bits": 4, "granularity": "per-group", "group_size": 32})
    >>> weight_scheme(cfg.weights).bits, cfg.activations.bits
    (4, 8)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..quant.act_scheme import ActScheme
from ..quant.args import FORMATS, QuantArgs
from ..quant.scheme import WeightScheme
from .base import StepConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdaRoundConfig(_Strict):
    iters: int = Field(500, ge=1, description="Adam iterations per layer")
    samples: int = Field(256, ge=1, description="calibration examples whose layer inputs are reconstructed")
    lam: float = Field(0.01, ge=0, description="weight of the rounding regularizer")
    lr: float = Field(1e-2, gt=0)
    batch: int = Field(64, ge=1, description="examples per iteration")


WEIGHT_FORMATS = Literal["int", "fp8-e4m3", "fp8-e5m2", "mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e3m2", "mxfp6-e2m3",
                         "mxfp4", "nvfp4"]
# the int grid's own options: a float format refuses them when set
_INT_ONLY = ("group_size", "levels", "clip", "adaround")


class WeightsConfig(_Strict):
    format: WEIGHT_FORMATS = Field("int", description="int (the integer grid below), fp8-e4m3 / fp8-e5m2 (per "
                                   "tensor or channel) or a block format simulated weight-only: mxfp8-e4m3, "
                                   "mxfp8-e5m2, mxfp6-e3m2, mxfp6-e2m3, mxfp4, nvfp4 (docs/formats.md)")
    bits: int = Field(8, ge=2, le=8, description="2..8 (8 may become 7 with reduce_range)")
    granularity: Literal["per-channel", "per-tensor", "per-group"] = "per-channel"
    group_size: int | None = Field(None, ge=1, description="weights per group (per-group only), along each "
                                   "output channel's flattened inputs; when it does not divide them the last "
                                   "group is shorter, with its own scale")
    symmetric: bool = True
    levels: Literal["uniform", "pow2", "nf4", "kmeans"] = Field(
        "uniform", description="uniform integer grid, power-of-two levels, the NF4 table (bits 4) or "
        "2**bits k-means levels per layer; non-uniform levels are scaled by each row's absmax")
    clip: Literal["none", "mse"] = Field("none", description="mse: search each row's clipping ratio")
    adaround: AdaRoundConfig | None = Field(None, description="learned rounding on calibration data")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weight codes (|w| <= 63) so that ONNX Runtime's u8s8 kernels cannot saturate "
        "on x86 CPUs without VNNI; 'auto': only when the CPU running the step lacks VNNI")

    def args(self, bits: int | None = None) -> QuantArgs:
        """The weights' :class:`~nnsqueeze.quant.args.QuantArgs` (``bits``: the reduced-range choice)."""
        if self.format == "int":
            return weight_scheme(self, bits).args()
        bad = [k for k in _INT_ONLY if getattr(self, k) not in (None, "uniform", "none")]
        if bad:
            raise ValueError(f"{', '.join(bad)} belong to the int grid, not format {self.format}")
        gran = self.granularity
        if FORMATS[self.format].kind == "block":  # blocks run along each output channel's inputs
            if gran != "per-channel":
                raise ValueError(f"{self.format} is block({FORMATS[self.format].block}) by its spec: leave "
                                 "granularity out")
            gran = ""
        return QuantArgs(format=self.format, bits=self.bits, symmetric=self.symmetric, granularity=gran)

    @model_validator(mode="before")
    @classmethod
    def _format_bits(cls, data: Any) -> Any:
        """A float format fixes the width: ``bits`` defaults to it (so the resolved config says it)."""
        if isinstance(data, dict) and data.get("format", "int") in FORMATS and data.get("format", "int") != "int" \
                and "bits" not in data:
            data = {**data, "bits": FORMATS[data["format"]].bits}
        return data

    @model_validator(mode="after")
    def _format_fits(self) -> "WeightsConfig":
        if self.format != "int":
            self.args()  # raises ValueError (a RecipeError in a recipe) for a combination the format refuses
        return self


class ActivationsConfig(_Strict):
    format: Literal["int", "fp8-e4m3", "fp8-e5m2", "none"] = Field(
        "int", description="int (bits below), fp8: per-tensor FP8 codes, scale = calibrated amax / max (or the "
        "current input's, dynamic), or none: float activations (fp8 and none need a float weights format, where "
        "none is the default)")
    bits: Literal[2, 3, 4, 5, 6, 7, 8, 16] = Field(8, description="2..8 or 16 bits per activation code")
    granularity: Literal["per-tensor", "per-channel", "per-token"] = Field(
        "per-tensor", description="per-token: fp8 dynamic only, one scale per row of a Linear's input")
    dynamic: bool = Field(False, description="fp8 only: the scale is amax(|x|) / max of the current input, "
                          "computed at run time (in the ONNX graph too), per tensor or per token; no calibration")
    symmetric: bool = Field(False, description="true: signed codes, zero point 0; false: unsigned codes with "
                            "a zero point (uint8 by default)")

    def args(self, observer: str | None = "minmax") -> QuantArgs:
        """The activations' :class:`~nnsqueeze.quant.args.QuantArgs` (``observer``: the calibration method)."""
        if self.format == "int":
            return act_scheme(self).args(observer)
        if self.format == "none":
            raise ValueError("activations format none has no QuantArgs: they stay float")
        if (self.bits, self.symmetric) != (8, True):
            raise ValueError(f"format {self.format} is 8-bit and symmetric: leave bits and symmetric out")
        if self.granularity == "per-channel":
            raise ValueError(f"activations format {self.format} takes granularity per-tensor (static or dynamic) "
                             "or per-token (dynamic: true), not per-channel")
        if self.granularity == "per-token" and not self.dynamic:
            raise ValueError("granularity per-token is a run-time scale per row: add dynamic: true")
        return QuantArgs(format=self.format, granularity=self.granularity,
                         observer=None if self.dynamic else observer, dynamic=self.dynamic)

    @model_validator(mode="before")
    @classmethod
    def _fp8_symmetric(cls, data: Any) -> Any:
        """FP8 is sign-magnitude: ``symmetric`` defaults to true there (so the resolved config says it)."""
        if isinstance(data, dict) and str(data.get("format", "")).startswith("fp8") and "symmetric" not in data:
            data = {**data, "symmetric": True}
        return data

    @model_validator(mode="after")
    def _format_fits(self) -> "ActivationsConfig":
        if self.format.startswith("fp8"):
            self.args()
        elif self.dynamic or self.granularity == "per-token":
            raise ValueError(f"dynamic / per-token activations here are fp8 only (format {self.format}): write "
                             "format: fp8-e4m3, or use the quantize-dynamic step for dynamic int8")
        return self


class CalibrationConfig(_Strict):
    method: str = Field("minmax", description="an observer name (nnsqueeze.registry.OBSERVERS)")
    samples: int = Field(512, ge=1, description="calibration examples (whole batches, at least this many)")


class EqualizeConfig(_Strict):
    method: Literal["cle", "smoothquant", "range"] = Field(
        "cle", description="cle: balance weight ranges (Nagel et al. 2019); smoothquant: migrate activation "
        "outliers into weights; range: scale each channel entering a depthwise conv to the same activation "
        "maximum (free for per-channel weights); pairs across a ReLU6 are left alone (nnsqueeze.quant.equalize)")
    iterations: int = Field(2, ge=1, description="CLE sweeps over the pairs")
    alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength")
    bias_absorption: bool = Field(False, description="after equalizing, move max(0, mean - 3 std) of each "
                                  "pair's pre-activation from L1's bias into L2's (L2 without padding)")


class QuantizeConfig(StepConfig):
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    fold_bn: bool = True
    bias_correction: bool = Field(True, description="shift biases so the weight rounding error has zero mean on "
                                  "the calibration data (Nagel et al. 2019)")
    equalize: EqualizeConfig | None = Field(None, description="rescale consecutive layers before quantizing")
    layer_weights: dict[str, WeightsConfig] = Field(
        default_factory=dict, description="per-layer weight schemes by exact module name (override 'weights')")
    layer_activations: dict[str, ActivationsConfig] = Field(
        default_factory=dict, description="per-layer activation formats by exact module name (override "
        "'activations'; the layer's input and, for convs, its output)")
    wide_first: int = Field(0, ge=0, description="the first N quantized layers (in registration, usually "
                            "forward, order) without a layer_activations entry get 16-bit activations: a mobile "
                            "CNN's first layers carry the image in few channels at full resolution, where 8-bit "
                            "per-tensor codes cost most; ORT runs them in float (a few % of the MACs)")
    ops: list[Literal["add", "matmul"]] = Field(
        default_factory=list, description="also quantize the inputs of these ops between two activations "
        "(uint8 per tensor; add: residual adds, output too -> QLinearAdd; matmul: matmul/bmm/@, and Hugging Face "
        "attention's q@k^T and p@v); see nnsqueeze.quant.functional")

    @model_validator(mode="before")
    @classmethod
    def _float_activations(cls, data: Any) -> Any:
        """Float weights without an ``activations`` entry: float activations (weight-only), said explicitly."""
        if isinstance(data, dict) and isinstance(data.get("weights"), dict) and "activations" not in data \
                and data["weights"].get("format", "int") != "int":
            data = {**data, "activations": {"format": "none"}}
        return data

    @model_validator(mode="after")
    def _one_family(self) -> "QuantizeConfig":
        """Float formats (FP8/MX/NVFP4) run in their own module kind: no int layers, activations or ops beside."""
        floats = self.weights.format != "int"
        if self.activations.format != "int" and not floats:
            raise ValueError(f"activations format {self.activations.format} needs float weights: add weights: "
                             "{format: fp8-e4m3} (or another float format)")
        if not floats:
            if any(w.format != "int" for w in self.layer_weights.values()):
                raise ValueError("layer_weights: a float format needs the step's weights in a float format too")
            return self
        if self.activations.format == "int":
            raise ValueError(f"weights format {self.weights.format} takes fp8 activations or none: write "
                             "activations: {format: fp8-e4m3} or leave activations out (float activations)")
        unsupported = [k for k in ("layer_weights", "layer_activations", "ops", "equalize") if getattr(self, k)]
        unsupported += ["wide_first"] * bool(self.wide_first)
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} are not supported with float formats yet "
                             f"(weights format {self.weights.format})")
        return self


SUPPORTED_TEXT = ("weights: bits 2..8, symmetric or not, per-channel / per-tensor / per-group (group_size), "
                  "levels uniform / pow2 / nf4 (bits 4) / kmeans; activations: bits 2..8 or 16, granularity "
                  "per-tensor, symmetric true (signed codes) or false (unsigned codes, zero point)")


def weight_scheme(w: WeightsConfig, bits: int | None = None) -> WeightScheme:
    """The :class:`WeightScheme` of a weights config (``bits`` overrides, e.g. reduced range)."""
    return WeightScheme(bits=bits or w.bits, symmetric=w.symmetric, granularity=w.granularity,
                        group_size=w.group_size, levels=w.levels, clip=w.clip)


def act_scheme(a: ActivationsConfig) -> ActScheme:
    """The :class:`ActScheme` of an activations config."""
    return ActScheme(bits=int(a.bits), symmetric=bool(a.symmetric))
