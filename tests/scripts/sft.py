"""An SFT script in the shape of trl's ``trl/scripts/sft.py``: ScriptArguments, SFTConfig and ModelConfig parsed by
TrlParser, the model passed as its id with ``args.model_init_kwargs`` and ``quantization_config`` /
``peft_config`` built from the ModelConfig flags (``--load_in_4bit``, ``--use_peft``), then train, save and
``push_to_hub(dataset_name=...)``. Written for the tests; the one line a user changes is marked ``# Uni-LoRA``.

Data: ``--dataset_name`` is a local JSON-lines file (a ``text``, ``prompt``/``completion`` or ``messages``
column), loaded with ``datasets.load_dataset("json", ...)``.
"""

from __future__ import annotations

import sys


def main(script_args, training_args, model_args) -> None:
    from datasets import load_dataset
    from trl import get_peft_config, get_quantization_config

    from unilora_hf import UniLoraConfig
    from unilora_hf.sft_trainer import UniLoraSFTTrainer

    training_args.model_init_kwargs = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                                           **(training_args.model_init_kwargs or {}))
    dataset = load_dataset("json", data_files={"train": script_args.dataset_name})
    trainer = UniLoraSFTTrainer(  # Uni-LoRA: was SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        unilora_config=UniLoraConfig(r=4, theta_d_length=2048, target_modules="all-linear"),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        print(f"Model pushed to the Hub in {trainer.hub_model_id}.")


def parse(argv: list[str] | None = None):
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv, fail_with_unknown_args=False)[:3]


if __name__ == "__main__":
    main(*parse(sys.argv[1:]))
