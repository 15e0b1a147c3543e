"""Describe every 200-frame window of a canonical dataset with a vision-language model (Hydra entry
point; config: conf/annotate.yaml; library: gdpo_listener.envs.annotate).

    python train/annotate.py dataset=data/dualtalk videos=/path/to/videos vlm=/path/to/Qwen2.5-VL-7B-Instruct device=cuda
    python train/annotate.py dataset=DIR vlm=DIR flame_model=FLAME2020/generic_model.pkl   # render sides without video
    python train/annotate.py dataset=DIR videos=DIR vlm=DIR overwrite=true prompt_file=my_prompt.txt

Videos are named ``VIDEOS/<id>_s<side>.mp4`` (or .mkv/.mov/.avi/.webm), like the dataset's audio.
All frame sources are checked (present, long enough) before the model is loaded. Descriptions are
written into ``DATASET/conversations/<id>.json`` after every batch, atomically; rerunning the
same command after a kill continues with the windows not yet described.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig


def fail(msg: str) -> None:
    raise SystemExit(f"annotate: error: {msg}")


def path_or_none(value) -> Path | None:
    return None if value is None or str(value).strip() == "" else Path(to_absolute_path(str(value)))


def resolve_prompt(cfg: DictConfig) -> str:
    """The configured prompt: ``prompt``, or the contents of ``prompt_file``, or the paper's Table 7."""
    from gdpo_listener.envs.annotate import TABLE7_PROMPT

    prompt_file = path_or_none(cfg.prompt_file)
    if cfg.prompt is not None and prompt_file is not None:
        fail("give prompt= or prompt_file=, not both")
    if prompt_file is not None:
        if not prompt_file.is_file():
            fail(f"prompt_file {prompt_file} does not exist")
        prompt = prompt_file.read_text(encoding="utf-8").strip()
    else:
        prompt = TABLE7_PROMPT if cfg.prompt is None else str(cfg.prompt).strip()
    if not prompt:
        fail("the prompt is empty")
    return prompt


@hydra.main(version_base="1.3", config_path="conf", config_name="annotate")
def main(cfg: DictConfig) -> None:
    from gdpo_listener.envs.annotate import AnnotationError, VLMDescriber, plan_annotation, run_annotation
    from gdpo_listener.envs.dataset import DatasetFormatError

    dataset, videos, vlm = path_or_none(cfg.dataset), path_or_none(cfg.videos), path_or_none(cfg.vlm)
    flame_model = path_or_none(cfg.flame_model)
    if vlm is None or not vlm.is_dir():
        fail(f"vlm={cfg.vlm} must be a local folder holding the model and its processor (nothing is downloaded)")
    prompt = resolve_prompt(cfg)
    try:
        plan = plan_annotation(dataset, videos, flame_model=flame_model, split=str(cfg.split), overwrite=bool(cfg.overwrite))
    except (AnnotationError, DatasetFormatError, ValueError) as e:
        fail(str(e))
    print(f"[annotate] {dataset}: {plan.total} windows, {plan.skipped} already described, {plan.n_todo} to describe "
          f"in {len(plan.jobs)} conversation(s)")
    if plan.n_todo == 0:
        return
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    try:
        describer = VLMDescriber(vlm, device=str(cfg.device), dtype=cfg.dtype, prompt=prompt, prompt_role=str(cfg.prompt_role),
                                 user_text=str(cfg.user_text or ""), max_new_tokens=int(cfg.max_new_tokens))
        stats = run_annotation(plan, describer, batch_size=int(cfg.batch_size), provenance=describer.provenance(),
                               flame_model=flame_model, render_size=int(cfg.render_size),
                               max_side=None if cfg.max_side is None else int(cfg.max_side), progress=bool(cfg.progress))
    except AnnotationError as e:
        fail(str(e))
    print(f"[annotate] described {stats.described} window(s) in {stats.conversations} conversation(s) "
          f"in {stats.seconds:.1f} s ({stats.skipped} kept)")
    for text in stats.examples:
        print(f"  e.g. {text[:160]!r}{' ...' if len(text) > 160 else ''}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
