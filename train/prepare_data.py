"""Write a canonical dataset from one source (Hydra entry point; config: conf/prepare_data.yaml).

    python train/prepare_data.py source=synthetic out=data/synthetic
    python train/prepare_data.py source=synthetic out=DIR synthetic.n_conversations=4 synthetic.seconds=32 seed=1
    python train/prepare_data.py source=synthetic out=DIR synthetic.version=1      # the original corpus
    python train/prepare_data.py source=dualtalk input=DIR out=DIR [dualtalk.vad=energy]
    python train/prepare_data.py source=seamless input=DIR out=DIR [seamless.vad=silero]

Prints a summary (hours, conversations, speaking/listening share, per-group motion std, time),
the dataset's motion statistics side by side with the real-data reference figures
(``envs/reference_stats.py``), and, once the dataset is complete, writes
OUT/preview_speaking.png and OUT/preview_listening.png (the training window with the most
speaking / listening frames). Paths are relative to the
launch folder; Hydra writes no output folder for this script.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

SOURCES = ("synthetic", "dualtalk", "seamless")


def fail(msg: str) -> None:
    """Stop with a clear message on stderr and exit code 1 (nothing has been written)."""
    raise SystemExit(f"prepare_data: error: {msg}")


def check_config(cfg: DictConfig) -> tuple[str, Path, Path | None]:
    source = str(cfg.source)
    if source not in SOURCES:
        fail(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if cfg.out is None or str(cfg.out).strip() == "":
        fail("out=DIR is required (the folder the dataset is written to)")
    out = Path(to_absolute_path(str(cfg.out)))
    from gdpo_listener.envs.dataset import check_output_folder

    try:  # the writer replaces an existing `out` as a whole: only ever this project's own dataset
        check_output_folder(out)
    except FileExistsError as e:
        fail(str(e))
    inp = None
    if source != "synthetic":
        if cfg.input is None or str(cfg.input).strip() == "":
            fail(f"source={source} needs input=DIR (the folder holding the {source} files)")
        inp = Path(to_absolute_path(str(cfg.input)))
        if not inp.is_dir():
            fail(f"input folder {inp} does not exist or is not a folder")
        if inp.resolve() == out.resolve():
            fail(f"out ({out}) must differ from input")
    return source, out, inp


def converter_options(cfg: DictConfig, source: str) -> dict:
    opts = {k: v for k, v in OmegaConf.to_container(cfg.get(source) or {}, resolve=True).items() if v is not None}
    opts.setdefault("test_fraction", float(cfg.test_fraction))
    return opts


def build(cfg: DictConfig, source: str, out: Path, inp: Path | None) -> dict:
    if source == "synthetic":
        from gdpo_listener.envs.synthetic import generate_corpus

        s = cfg.synthetic
        return generate_corpus(out, n_conversations=int(s.n_conversations), seconds=float(s.seconds), seed=int(cfg.seed),
                               test_fraction=float(cfg.test_fraction), progress=True, workers=int(s.get("workers", 1)),
                               version=int(s.get("version", 2)), idle_expr_rank=s.get("idle_expr_rank"))
    opts = converter_options(cfg, source)
    if source == "dualtalk":
        from gdpo_listener.envs.converters.dualtalk import convert_dualtalk

        return convert_dualtalk(inp, out, **opts)
    from gdpo_listener.envs.converters.seamless import convert_seamless

    return convert_seamless(inp, out, **opts)


def print_reference_comparison(out: Path) -> None:
    """The dataset's motion statistics next to the real-data reference (envs/reference_stats.py)."""
    from gdpo_listener.envs.reference_stats import corpus_statistics, format_table

    print(format_table(corpus_statistics(out)))


def choose_preview_windows(ds) -> dict[str, int]:
    """Index of the window with the most speaking frames and of the one with the most listening
    frames (first one on ties) in a :class:`DyadicWindows`."""
    best = {"speaking": (-1, 0), "listening": (-1, 0)}
    for i, ix in enumerate(ds.index):
        vad = ds.conversation(ix.conversation).vad
        s, e = ix.window * ds.window, (ix.window + 1) * ds.window
        act, ptn = vad[ix.actor, s:e], vad[1 - ix.actor, s:e]
        for role, n in (("speaking", int(act.sum())), ("listening", int((ptn & ~act).sum()))):
            if n > best[role][0]:
                best[role] = (n, i)
    return {role: i for role, (_, i) in best.items()}


def write_previews(out: Path) -> list[Path]:
    """Plot the train window with the most speaking frames and the one with the most listening."""
    from gdpo_listener.envs.dataset import DyadicWindows
    from gdpo_listener.envs.plots import plot_window

    ds = DyadicWindows(out, split="train", load_audio=False)
    if len(ds) == 0:
        print(f"[prepare_data] no full {ds.window}-frame window in the train split: previews skipped")
        return []
    return [plot_window(ds[i], out / f"preview_{role}.png") for role, i in choose_preview_windows(ds).items()]


def print_summary(source: str, out: Path, summary: dict, seconds: float) -> None:
    print(f"[prepare_data] source={source} -> {out}")
    if summary.get("corpus_version") is not None:
        print(f"  synthetic corpus version: {summary['corpus_version']}")
    print(f"  conversations: {summary.get('conversations')} (train {summary.get('train')}, test {summary.get('test')})")
    print(f"  hours of conversation: {summary.get('hours', 0.0):.3f}")
    print(f"  speaking share: {summary.get('speaking_share', 0.0):.3f}   listening share: {summary.get('listening_share', 0.0):.3f}")
    gs = summary.get("group_std") or {}
    print("  per-group motion std (mean over channels and sides): "
          + "  ".join(f"{g}={v:.4f}" if v is not None else f"{g}=n/a" for g, v in gs.items()))
    if summary.get("intent_counts"):
        print("  intents (windows): " + ", ".join(f"{k}={v}" for k, v in summary["intent_counts"].items()))
    if summary.get("text_kind_counts"):
        print("  window texts: " + ", ".join(f"{k}={v}" for k, v in summary["text_kind_counts"].items()))
    if summary.get("skipped"):
        print(f"  skipped: {len(summary['skipped'])} item(s)")
    print(f"  time: {seconds:.1f} s")


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    source, out, inp = check_config(cfg)  # before any work
    t0 = time.perf_counter()
    summary = build(cfg, source, out, inp)
    elapsed = time.perf_counter() - t0
    print_summary(source, out, summary, elapsed)
    if summary.get("conversations"):
        print_reference_comparison(out)
    if cfg.preview:
        for p in write_previews(out):
            print(f"  preview: {p}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
