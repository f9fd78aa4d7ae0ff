"""The ``nnsqueeze`` command line.

    nnsqueeze demo --out nnsqueeze-demo
    nnsqueeze compress --model mypkg.models:build --weights w.safetensors --recipe int8 \
        --data mypkg.data:load --out out/
    nnsqueeze report out/
    nnsqueeze recipes

User errors exit with code 2 and a short message naming the problem and the fix (``--debug``
shows the traceback); success exits 0. ``--model``/``--data`` name ``module:factory`` (never looked up
in the current directory: use PYTHONPATH) or ``path/to/file.py:factory``. A non-empty ``--out`` is
refused unless ``--overwrite``, which replaces only nnsqueeze's own files (see nnsqueeze.safeio).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import DataError, ExportError, ModelError, NnsqueezeError, RecipeError
from .inputs import call_factory, data_from_spec, load_weights, model_from_spec

log = logging.getLogger("nnsqueeze")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained PyTorch models smaller and faster, measured and verified in ONNX Runtime.")
console = Console(stderr=True)
_state = {"debug": False}
OVERWRITE_HELP = ("replace an existing artifact's files in a non-empty directory (only the files nnsqueeze "
                  "writes; everything else there is kept)")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings and the result")) -> None:
    _state["debug"] = debug
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)


def _run(fn) -> None:
    try:
        fn()
    except NnsqueezeError as e:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


# The images:DIR options of `compress` and `sensitivity` (typer options may be shared as defaults).
IMAGE_SIZE = typer.Option(None, "--image-size", help="images:DIR crop size (default: the model's own "
                          "preprocessing, else 224)")
IMAGE_MEAN = typer.Option(None, help="images:DIR normalisation mean per channel [default: 0.485,0.456,0.406, "
                          "ImageNet's]")
IMAGE_STD = typer.Option(None, help="images:DIR normalisation std per channel [default: 0.229,0.224,0.225]")


@app.command()
def compress(
    model: str = typer.Option(..., help="MODULE:FACTORY returning the fp32 torch model, path/file.py:FACTORY, "
                              "a Hugging Face model directory, or a .gguf file"),
    recipe: str = typer.Option(..., help="recipe YAML file or preset name (see `nnsqueeze recipes`)"),
    data: str = typer.Option(..., help="'mnist1d', MODULE:FACTORY returning {'train','calib','eval'} batches, or "
                             "(with a Hugging Face --model) a text corpus: .txt, .jsonl/.csv/.parquet[:COLUMN], "
                             "or a datasets directory; or images:DIR (docs/vision.md)"),
    out: Path = typer.Option(..., help="directory to write (a new or empty one appears whole, atomically)"),
    weights: Optional[Path] = typer.Option(None, help=".safetensors (or torch state_dict) for the model"),
    metric: Optional[str] = typer.Option(None, help="metric name (default: accuracy; perplexity for text data)"),
    task: Optional[str] = typer.Option(None, help="causal-lm, feature-extraction or sequence-classification "
                                       "(default: from the Hugging Face config's architectures)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration/evaluation window (text data)"),
    samples: int = typer.Option(32, help="calibration windows (text data)"),
    image_size: Optional[int] = IMAGE_SIZE,
    mean: Optional[str] = IMAGE_MEAN,
    std: Optional[str] = IMAGE_STD,
    format: Optional[str] = typer.Option(None, "--format", help="write --out as a checkpoint other runtimes load "
                                         "instead of an nnsqueeze artifact: compressed-tensors, gptq or gguf "
                                         "(packed causal LMs, see docs/llm.md; compressed-tensors also holds FP8 "
                                         "E4M3 from quantize, docs/formats.md)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Compress a model with a recipe, verify the ONNX export, write the artifact and print the report."""

    def go() -> None:
        from . import hf_io
        from .artifact import check_out
        from .pipeline import compress as run
        from .recipe import load_recipe

        if format is not None:
            from .export.hf_formats import FORMATS

            if format not in FORMATS:
                raise ExportError("--format", f"unknown format {format!r}", fix=f"use one of: {', '.join(FORMATS)}")
        check_out(out, overwrite, where="--out")  # a refused or unwritable --out, before a long run
        r = load_recipe(recipe)  # fail fast on a bad recipe, before the model is even built
        tokenizer = None
        if hf_io.is_model_path(model):
            m, tokenizer = hf_io.load_model(model, task)
        else:
            if task is not None:
                raise ModelError("--task", "applies to a Hugging Face model directory or .gguf file only",
                                 fix="drop --task, or give --model PATH_TO_HF_DIR")
            m = model_from_spec(model, weights is not None)
        if weights is not None:
            load_weights(m, weights)
        if format is not None:  # a scheme the format cannot hold fails now, not after the whole run
            from .export.hf_formats import check_recipe
            from .export.preflight import fit_groups

            for msg in fit_groups(m, r, format):
                log.warning(msg)
            check_recipe(m, r, format)
        if hf_io.is_text_path(data):
            if tokenizer is None:
                raise DataError("--data", f"{data} is text, and only a Hugging Face --model brings a tokenizer",
                                fix="give --model PATH_TO_HF_DIR (with tokenizer files), or a MODULE:FACTORY "
                                    "--data that returns token batches")
            d = hf_io.load_text_data(data, tokenizer, seq_len=seq_len, samples=samples)
            name = metric or ("perplexity" if hf_io.task_of_model(m) == "causal-lm" else None)
        else:
            d = data_from_spec(data, m, {"size": image_size, "mean": mean, "std": std, "metric": metric})
            name = metric or d.get("metric") or "accuracy"
        result = run(m, r, train_data=d.get("train"), calib_data=d.get("calib"), eval_data=d.get("eval"),
                     metric=name)
        from . import distributed

        if not distributed.is_main():  # under torchrun, every rank computes; rank 0 alone writes
            return
        result.report.print(Console())
        path = result.save(out, format=format, tokenizer=tokenizer, overwrite=overwrite)
        Console().print(f"{format or 'artifact'} written to [bold]{path}[/]")

    _run(go)


@app.command()
def sensitivity(
    model: str = typer.Option(..., help="MODULE:FACTORY returning the fp32 torch model, or torchvision:NAME / "
                              "timm:NAME"),
    data: str = typer.Option(..., help="'mnist1d', MODULE:FACTORY returning {'train','calib','eval'} batches, "
                             "or images:DIR"),
    out: Path = typer.Option(..., help="JSON file to write (atomically)"),
    weights: Optional[Path] = typer.Option(None, help=".safetensors (or torch state_dict) for the model"),
    plot: Optional[Path] = typer.Option(None, help="also draw a bar chart (PNG) here"),
    metric: Optional[str] = typer.Option(None, help="metric name, used when the data has 'eval' batches "
                                         "(default: accuracy; agreement for unlabelled images)"),
    image_size: Optional[int] = IMAGE_SIZE,
    mean: Optional[str] = IMAGE_MEAN,
    std: Optional[str] = IMAGE_STD,
    formats: str = typer.Option("int8", help="comma-separated formats to try per layer "
                                "(nnsqueeze.sensitivity.FORMATS, e.g. int8,int4; FLOAT_FORMATS, e.g. "
                                "fp8-e4m3,mxfp4; fp16,bf16 for half precision)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing --out / --plot files"),
) -> None:
    """Quantize (or cast to fp16/bf16) one layer at a time, the rest fp32, and rank the layers by the damage done."""

    def go() -> None:
        import json
        import math

        from rich.table import Table

        from .safeio import check_file_target, write_file
        from .sensitivity import plot_png, sensitivity as run, to_json_rows

        targets = {"--out": out} if plot is None else {"--out": out, "--plot": plot}
        for opt, path in targets.items():  # before the run: it takes a while
            check_file_target(path, opt, overwrite=overwrite)
        m = model_from_spec(model, weights is not None)
        if weights is not None:
            load_weights(m, weights)
        d = data_from_spec(data, m, {"size": image_size, "mean": mean, "std": std, "metric": metric})
        name = metric or d.get("metric") or "accuracy"
        calib = d.get("calib") or d.get("train")
        if calib is None:
            raise DataError("--data", f"{data} gives no 'calib' (or 'train') batches",
                            fix="return {'calib': batches, 'eval': batches}")
        rows = run(m, calib, eval_data=d.get("eval"), metric=name if d.get("eval") is not None else None,
                   formats=[f.strip() for f in formats.split(",") if f.strip()])
        write_file(out, json.dumps({"model": model, "data": data, "rows": to_json_rows(rows)}, indent=2).encode(),
                   "--out", overwrite=overwrite)
        if plot is not None:
            write_file(plot, plot_png(rows), "--plot", overwrite=overwrite)
        t = Table(title="sensitivity (one layer at a time in each format, the rest fp32), most sensitive first")
        for col in ("layer", "type", "format", "output SQNR (dB)") + (("metric drop",) if rows and
                                                                       "metric_drop" in rows[0] else ()):
            t.add_column(col)
        for r in rows:
            s = r["sqnr_db"]
            cells = [r["layer"], r["type"], r["format"], f"{s:.2f}" if math.isfinite(s) else str(s)]
            if "metric_drop" in r:
                cells.append(f"{r['metric_drop']:+.4f}")
            t.add_row(*cells)
        Console().print(t)
        Console().print(f"written to [bold]{out}[/]" + (f" and [bold]{plot}[/]" if plot is not None else ""))

    _run(go)


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="artifact directory to write "
                                            "[default: nnsqueeze-demo, or nnsqueeze-demo-llm with --llm]"),
         retrain: bool = typer.Option(False, help="retrain the baseline instead of using the cache"),
         llm: bool = typer.Option(False, "--llm", help="the language-model demo: GPTQ int4 (w4-g128-gptq) on "
                                  "the embedded LLaMA-style LM trained on Python's own docs"),
         size: str = typer.Option("default", help="--llm model size: default, or tiny (a seconds-long smoke run)"),
         overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP + "; without it, a previous demo "
                                        "artifact holding nothing else is replaced")) -> None:
    """Train (or load the cached) MNIST-1D CNN, apply `prune-int8`, check the targets, write the artifact.

    With --llm: train (or load) the embedded language model, compress it with `w4-g128-gptq`, print
    fp32 vs packed int4 perplexity, bytes and generation speed, check the targets, write the artifact."""

    def go() -> None:
        if llm:
            from .demo_llm import run_demo_llm
            from .zoo.pylm import SIZES

            if size not in SIZES:
                raise typer.BadParameter(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
            ok = run_demo_llm(out or Path("nnsqueeze-demo-llm"), size=size, retrain=retrain, console=Console(),
                              overwrite=overwrite)
            if not ok:
                raise typer.Exit(1)
            return
        if size != "default":
            raise typer.BadParameter("--size applies to --llm only")
        from .demo import run_demo

        ok = run_demo(out or Path("nnsqueeze-demo"), retrain=retrain, console=Console(), overwrite=overwrite)
        if not ok:
            raise typer.Exit(1)

    _run(go)


@app.command()
def search(
    model: str = typer.Option(..., help="MODULE:FACTORY returning the fp32 torch model"),
    data: str = typer.Option(..., help="'mnist1d' or MODULE:FACTORY returning {'train','calib','eval'} batches"),
    space: str = typer.Option(..., help="search space YAML, or a shipped space: cnn, encoder, llm"),
    out: Path = typer.Option(..., help="search directory: new or empty, or an existing search of the same "
                             "arguments, which resumes"),
    max_drop: float = typer.Option(..., help="largest metric drop allowed (accuracy 0.01 = one point)"),
    trials: int = typer.Option(40, help="finished trials (complete + pruned) to reach; raise it to extend a search"),
    target_latency: Optional[float] = typer.Option(None, help="constraint: ONNX Runtime latency in ms"),
    target_size: Optional[float] = typer.Option(None, help="constraint: ONNX file size in bytes"),
    workers: int = typer.Option(1, help="trial processes on this machine (threads each: cpu_count // workers)"),
    storage: Optional[str] = typer.Option(None, help="optuna storage URL shared by several machines "
                                          "(postgresql://..., mysql+pymysql://...) [default: sqlite in --out]"),
    pick: Optional[int] = typer.Option(None, help="choose this trial instead of the fastest within the constraints"),
    sampler: str = typer.Option("nsga2", help="nsga2 or tpe"),
    seed: int = typer.Option(0, help="sampler seed"),
    weights: Optional[Path] = typer.Option(None, help=".safetensors (or torch state_dict) for the model"),
    metric: str = typer.Option("accuracy", help="metric name"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="share recipe prefixes between trials"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over in an existing search directory (only "
                                   "the search's own files are removed), or write beside other files"),
    enqueue: Optional[Path] = typer.Option(None, help="YAML/JSON list of param values ({prune.sparsity: 0.5, ...}) "
                                           "to run first, before the sampler's trials"),
) -> None:
    """Search a space of recipes for the Pareto front of metric, ONNX size and ONNX Runtime latency."""

    def go() -> None:
        from .search.api import check_args, search as run
        from .search.front import table
        from .search.space import load_space

        check_args(max_drop, target_latency, target_size, trials, workers, sampler, pick)
        sp = load_space(space)  # a bad space fails before the model is built
        queued = _enqueued(enqueue, sp)
        m = call_factory(model, "--model", ModelError)
        if weights is not None:
            load_weights(m, weights)
        d = data_from_spec(data)
        res = run(m, sp, train_data=d.get("train"), calib_data=d.get("calib"), eval_data=d.get("eval"),
                  metric=metric, max_drop=max_drop, target_latency=target_latency, target_size=target_size,
                  trials=trials, out=out, workers=workers, sampler=sampler, seed=seed, storage=storage, pick=pick,
                  overwrite=overwrite, cache=cache, model_spec=model, enqueue=queued)
        c = Console()
        c.print(table(res.front, f"Pareto front ({res.trials} trials, {res.pruned} pruned, "
                                 f"{res.cache_hits} cache hits)"))
        c.print(f"chosen: trial {res.best['trial']} -> [bold]{out / 'best.yaml'}[/], artifact [bold]{out / 'best'}[/]; "
                f"front: {out / 'front.json'}, {out / 'front.png'}")

    _run(go)


def _enqueued(path: Path | None, space) -> list[dict]:
    """--enqueue FILE: a YAML (or JSON) list of param-value mappings, checked against the space."""
    if path is None:
        return []
    from .recipe import parse_yaml

    if not path.is_file():
        raise RecipeError(f"--enqueue {path}", "file not found", fix="give a YAML list of param-value mappings")
    items = parse_yaml(path.read_text(), f"--enqueue {path}")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"--enqueue {path}", "expected a non-empty list of param-value mappings",
                          fix="e.g. '- {prune.sparsity: 0.5, quantize.weights.bits: 8}'")
    return [space.check_values(v, f"--enqueue {path}: item {i}") for i, v in enumerate(items)]


@app.command()
def report(path: Path = typer.Argument(..., help="artifact directory or search directory"),
           markdown: bool = typer.Option(False, "--markdown", help="print report.md instead of a table"),
           html: bool = typer.Option(False, "--html", help="write DIR/report.html (self-contained) and print its path")
           ) -> None:
    """Print the report of an artifact directory (or the front of a search directory)."""

    def go() -> None:
        from .artifact import read_manifest
        from .errors import ArtifactError
        from .report import Report
        from .search.study import MARKER

        if html:
            from .safeio import write_file
            from .search.html import report_html

            text = report_html(path)
            print(write_file(path / "report.html", text.encode(), "report --html"))
            return
        if (path / MARKER).is_file():
            import json

            from .search.front import table

            fj = path / "front.json"
            if not fj.is_file():
                raise ArtifactError(str(path), "this search has no front.json yet", fix="run or resume it first")
            Console().print(table(json.loads(fj.read_text()).get("front", [])))
            return
        read_manifest(path)
        rp = path / "report.json"
        if not rp.is_file():
            raise ArtifactError(str(path), "missing report.json", fix="re-create the artifact")
        r = Report.read(rp)  # bounded size and depth, checked shape
        if markdown:
            print(r.to_markdown())
        else:
            r.print(Console())

    _run(go)


@app.command()
def plot(path: Path = typer.Argument(..., help="artifact directory")) -> None:
    """Draw weight-code histograms with their grid, activation ranges and per-layer error (PNG, in DIR/plots)."""

    def go() -> None:
        from .plot import plot_artifact

        for p in plot_artifact(path):
            print(p)

    _run(go)


@app.command()
def recipes(show: Optional[str] = typer.Argument(None, help="preset name to print as YAML")) -> None:
    """List the shipped presets, or print one as a resolved YAML recipe."""

    def go() -> None:
        from .recipe import load_recipe, presets

        if show:
            print(load_recipe(show).to_yaml(), end="")
            return
        c = Console()
        for name, desc in presets().items():
            c.print(f"[bold]{name}[/]: {desc}")

    _run(go)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
