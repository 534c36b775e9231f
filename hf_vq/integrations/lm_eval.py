"""lm-evaluation-harness tasks on a model as loaded (quantized or not, offloaded or not).

``evaluate(model, ["arc_easy", "hellaswag"])`` wraps the model object in lm_eval's ``HFLM`` and runs
``lm_eval.simple_evaluate``: the numbers are lm_eval's own for that model. Needs the ``eval`` extra
(``pip install 'hf_vq[eval]'``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

INSTALL_HINT = "pip install 'hf_vq[eval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as e:
        raise ImportError(f"hf_vq.evaluate runs lm-evaluation-harness, which is not installed ({e}): "
                          f"{INSTALL_HINT}") from e
    return lm_eval.simple_evaluate, HFLM, TaskManager, handle_non_serializable


def _task_list(tasks) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ValueError("tasks is empty: name at least one lm_eval task, e.g. tasks=['arc_easy']")
    return names


def _include_paths(include_path) -> list[Path]:
    if include_path is None:
        return []
    paths = [Path(p) for p in ((include_path,) if isinstance(include_path, (str, Path)) else include_path)]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"include_path {str(p)!r} does not exist: give the folder that holds your task "
                                    "YAML files")
    return paths


def _is_yaml_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def _resolve_tasks(names: list[str], paths: list[Path], TaskManager):
    """(task manager, task specs): names found in the index, glob patterns expanded, YAML file paths kept.

    Tasks found under ``include_path`` alone are looked up without indexing lm_eval's thousands of built-in task
    files (several seconds); anything else (built-in tasks, groups) uses the full index."""
    local = TaskManager(include_defaults=False, include_path=[str(p) for p in paths] or None)
    if all(_is_yaml_file(n) or n in local.all_subtasks for n in names):
        return local, names
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    specs, unknown = [], []
    for name in names:
        if name in manager.all_tasks or _is_yaml_file(name):
            specs.append(name)
        elif matches := manager.match_tasks([name]):
            specs.extend(m for m in matches if m not in specs)
        else:
            unknown.append(name)
    if unknown:
        where = [f"lm_eval's built-in tasks ({Path(_tasks_folder()).as_posix()})"]
        where += [f"include_path {str(p)!r}" for p in paths]
        close = sorted({c for n in unknown for c in difflib.get_close_matches(n, manager.all_tasks, n=3)})
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown lm_eval task(s) {', '.join(map(repr, unknown))}: not found in {' or '.join(where)}{hint}. "
            "`lm-eval ls tasks --include_path DIR` lists the names; a task of your own is a YAML file in a folder "
            "passed as include_path")
    return manager, specs


def _tasks_folder() -> str:
    import lm_eval.tasks
    return str(Path(lm_eval.tasks.__file__).parent)


def _tokenizer_for(model, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer
    source = str(tokenizer) if tokenizer is not None else getattr(model, "name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # any failure to find one: say what to pass
        raise ValueError(f"no tokenizer could be loaded from {source!r} ({type(e).__name__}: {e}); pass "
                         "tokenizer= (a tokenizer object, a folder or a Hub id)") from e


def _input_device(model) -> torch.device:
    """Where token ids go: the device the input embeddings compute on (accelerate's execution device when the
    model is dispatched with a device_map, so offloaded embeddings get ids on the device they run on)."""
    from hf_vq.pipeline.placement import execution_device
    return execution_device(model.get_input_embeddings())


def _place(model, device):
    """Move a model that no device_map dispatched to ``device``. A dispatched one stays where its device_map put it;
    ``device`` must then be where its input embeddings run."""
    if device is None:
        return
    if not getattr(model, "hf_device_map", None):
        model.to(device)
    elif torch.device(device) != _input_device(model):
        raise ValueError(f"device={device!r}: this model is dispatched with a device_map ({model.hf_device_map}), "
                         f"which decides where each block runs (its input embeddings on {_input_device(model)}); "
                         "leave device unset, or load the model with the device_map you want")


def evaluate(model, tasks, *, tokenizer=None, batch_size=1, limit=None, num_fewshot=None, include_path=None,
             device=None) -> dict:
    """Run lm-evaluation-harness ``tasks`` on ``model`` as loaded (an hf_vq quantized model, offloaded or not, or
    any transformers causal LM) and return lm_eval's results.

    ``tasks``: lm_eval task or group names (a list, or one comma-separated string), glob patterns, or paths of task
    YAML files. ``include_path``: a folder (or list of folders) of your own task YAML files; their tasks are found
    by name as the built-in ones are. ``tokenizer``: a tokenizer object, folder or Hub id; default: the one saved
    beside the model (``model.name_or_path``). ``batch_size``: an int, or ``"auto"``. ``limit``: at most this many
    documents per task (a float below 1 is a fraction); for quick checks, since the numbers are then not comparable
    with published ones. ``num_fewshot``: few-shot examples per prompt (default: each task's own). ``device``:
    where to run a model that is not dispatched with a device_map (it is moved there); default: where it is.

    Returns the dict ``lm_eval.simple_evaluate`` returns, without per-sample logs, with values JSON cannot hold
    (such as dtypes) written as lm_eval writes them, so ``json.dump`` saves it as is. Metrics are under
    ``result["results"][task]``, keyed ``"acc,none"``, ``"acc_norm,none"`` and so on (metric, filter).
    Raises ImportError without lm_eval, ValueError for a task name that is not found.
    """
    simple_evaluate, HFLM, TaskManager, handle_non_serializable = _import_lm_eval()
    names = _task_list(tasks)
    paths = _include_paths(include_path)
    manager, specs = _resolve_tasks(names, paths, TaskManager)
    tok = _tokenizer_for(model, tokenizer)
    _place(model, device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    if lm.device.type == "meta":
        # HFLM sends ids to model.device, its first parameter's: on "meta" when that one is offloaded to disk
        lm._device = _input_device(model)
    results = simple_evaluate(lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False)
    return json.loads(json.dumps(results, default=handle_non_serializable))
