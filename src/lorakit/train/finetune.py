"""`finetune`: the whole job behind `lorakit finetune`, from a model folder and a data file to
an adapter, metrics, a plot and a summary. Every option is checked before training starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LorakitError
from .distributed import DistEnv, barrier, broadcast_object, setup, teardown
from .eval_generate import GenerationScore, check_references, score_generation
from .finetune_data import FinetuneData, prepare_data
from .finetune_inputs import resolve_inputs
from .finetune_model import AdaptedModel, prepare_model
from .finetune_outputs import FinetuneResult, write_outputs
from .loop import train
from .options import TrainOptions
from .out_folder import check_out
from .state import trainable_state

DEMO_THREADS = 1  # see TrainOptions.threads


def finetune(
    options: TrainOptions | None = None,
    lora: LoraConfig | None = None,
    *,
    dump_params: str | None = None,
) -> FinetuneResult | None:
    """Finetune a local Hugging Face model with LoRA; returns the result on rank 0.

    With default options: the embedded demo (MiniLM-L6, VADER sentiment words, seq-cls).
    Under torchrun each rank calls this; ranks other than 0 return None.
    `dump_params` (for tests): each rank saves its trainable tensors to `<dir>/rank<r>.pt`.

    Raises:
        ConfigError: a bad option, model folder or task, before training starts; an `out`
            that is a file or not writable, or that holds an earlier run (an adapter or
            checkpoints) while neither `resume` nor `overwrite` is set.
        CheckpointError: `resume` with no checkpoint in `out`, or one that cannot be read.
        DataError: bad data, naming the file, line and field.
        TrainingError: the loss became NaN or inf.
    """
    options = options or TrainOptions()
    threads = options.threads or (DEMO_THREADS if options.model is None else 0)
    if threads:
        torch.set_num_threads(threads)
    env = setup()
    try:
        return _finetune(options, lora, env, dump_params)
    finally:
        teardown(env)


def _finetune(
    options: TrainOptions, lora: LoraConfig | None, env: DistEnv, dump_params: str | None
) -> FinetuneResult | None:
    """The job on this rank: inputs, data, model, training; the outputs on rank 0."""
    _check_out(options, env)  # before anything is written (the demo writes out/data)
    inputs = resolve_inputs(options, env)
    data = prepare_data(options, inputs)
    check_references(data.eval_records, data.tokenizer, data.eval_file, options.eval_generate)
    adapted = prepare_model(options, lora, inputs, data)
    before = None if options.resume else _generation_score(options, env, data, adapted, "before")
    result = train(
        adapted.model, data.train, data.eval, options,
        task=inputs.task, collate_fn=data.collator, env=env,
    )
    if dump_params:
        _dump_params(adapted.model, options, env, Path(dump_params))
    barrier(env)
    if not env.is_main:
        return None
    after = _generation_score(options, env, data, adapted, "after")
    return write_outputs(options, env, inputs, data, adapted, result, (before, after))


def _check_out(options: TrainOptions, env: DistEnv) -> None:
    """`check_out` on rank 0, its error raised on every rank (none waits for a failed one)."""
    error: LorakitError | None = None
    if env.is_main:
        try:
            check_out(options.out, options.resume, options.overwrite)
        except LorakitError as err:
            error = err
    error = broadcast_object(env, error)
    if error is not None:
        raise error


def _generation_score(
    options: TrainOptions, env: DistEnv, data: FinetuneData, adapted: AdaptedModel, when: str
) -> GenerationScore | None:
    """Exact match of greedy answers to the first `eval_generate` held-out prompts (rank 0;
    None when off)."""
    if not options.eval_generate or not env.is_main:
        return None
    score = score_generation(
        adapted.model, data.tokenizer, data.eval_records, data.eval_file,
        options.eval_generate, options.max_new_tokens,
    )  # fmt: skip
    print(f"exact match {when} training: {score.exact_match:.2f} ({score.n} prompts)", flush=True)
    return score


def _dump_params(model: nn.Module, options: TrainOptions, env: DistEnv, folder: Path) -> None:
    """Save this rank's trainable tensors to `folder`/rank<r>.pt (for tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state(model, options.fsdp), folder / f"rank{env.rank}.pt")
