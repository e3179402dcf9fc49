"""Worker for tests/test_distributed.py: `UniLoraTrainer` on the tiny Llama, under torchrun or alone.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py JOBS.json
    python tests/dist_worker.py JOBS.json                      (one process, the reference)

JOBS.json is a list of jobs run one after the other in the same process group; each job is a dict:
    name        sub-folder of the job's output (under "root")
    root        folder for all outputs
    mode        "single" | "ddp" | "fsdp2" | "fsdp1"
    steps       optimizer steps (max_steps)
    per_device  per-device batch size; every run sees the same global batch per step
    ac          None | "nonreentrant" | "reentrant" (Trainer's activation_checkpointing) | "fsdp" (FSDP2's own,
                fsdp_config["activation_checkpointing"]: accelerate wraps each decoder layer, non-reentrant)
    save_steps  save a checkpoint every that many steps (optional)
    resume      checkpoint folder to resume from (optional)
    static_graph          pass ddp_static_graph=True (optional)
    rank1_theta_differs   inject before the Trainer and give rank 1 another θ_d (optional)
    expect_error          record an exception of the Trainer and go on to the next job (optional)
    heads                 also train lm_head in full (modules_to_save) (optional)
Each job ends with ``trainer.save_model(<root>/<name>/final)`` on every rank (the adapter is written by rank 0).
Each rank records, in ``<root>/<name>/writes_rank<r>.txt``, every adapter file it wrote itself, and, in
``<root>/<name>/error_rank<r>.txt``, the message of an exception the Trainer raised.

accelerate only turns FSDP on for accelerator devices; on CPU it silently trains with DDP instead. So
`CpuFsdpTrainer` switches the accelerator state to FSDP right after the Trainer built it: from there on the
code that runs is the GPU code (accelerate's FSDP2 / FSDP1 preparation, the Trainer's FSDP branches),
on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import tiny_llama  # noqa: E402

import unilora_hf.serialization as serialization  # noqa: E402
from unilora_hf import AdapterStateError, UniLoraConfig, UniLoraTrainer, get_adapter, inject_adapter  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = UniLoraConfig(r=2, theta_d_length=301, target_modules=PROJECTIONS)
CFG_HEADS = UniLoraConfig(r=2, theta_d_length=301, target_modules=PROJECTIONS, modules_to_save=["lm_head"])


class Tokens(Dataset):
    """Fixed random token rows, all of one length (so per-rank mean losses average to the global mean)."""

    def __init__(self, n: int = 32, length: int = 10):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, 96, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CpuFsdpTrainer(UniLoraTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True
            if state.fsdp_plugin.fsdp_version == 1:
                # accelerate hands FSDP1 device_id=cpu:<local rank>, which FSDP1 does not match with "cpu".
                state.device = torch.device("cpu")
                # torch 2.13 FSDP1 bug, CPU only: _optim_utils._allgather_orig_param_states gathers every
                # optimizer state into ONE reused buffer and returns views of it, which become copies only
                # through .cpu() when offload_to_cpu is set; on a CPU compute device .cpu() is a no-op, so
                # exp_avg comes out equal to exp_avg_sq. Without offload it clones instead.
                state.fsdp_plugin.optim_state_dict_config.offload_to_cpu = False


def training_args(job: dict, out: Path):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), per_device_train_batch_size=job["per_device"], max_steps=job["steps"],
              learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], logging_steps=1, use_cpu=True,
              seed=0, data_seed=0, disable_tqdm=True, train_sampling_strategy="sequential",
              save_strategy="steps" if job.get("save_steps") else "no", save_steps=job.get("save_steps") or 500)
    if job.get("ac") and job["ac"] != "fsdp":
        kw.update(activation_checkpointing=True,
                  activation_checkpointing_kwargs={"use_reentrant": job["ac"] == "reentrant"})
    if job.get("static_graph"):
        kw.update(ddp_static_graph=True)
    if job["mode"] == "fsdp2":
        kw.update(fsdp=True, fsdp_config={"version": 2, "activation_checkpointing": job.get("ac") == "fsdp"})
    if job["mode"] == "fsdp1":
        # sync_module_states makes accelerate's FSDP1 plugin look for an accelerator device; every rank builds
        # the same seeded model here, so there is nothing to broadcast.
        kw.update(fsdp=True, fsdp_config={"version": 1, "use_orig_params": True, "sync_module_states": False})
    return TrainingArguments(**kw)


def run_job(job: dict) -> None:
    rank = int(os.environ.get("RANK", 0))
    out = Path(job["root"]) / job["name"]
    out.mkdir(parents=True, exist_ok=True)
    real_write_folder = serialization.write_folder

    def recording_write_folder(folder, files, remove=frozenset()):
        with open(out / f"writes_rank{rank}.txt", "a") as f:
            f.write(f"{folder}\n")
        return real_write_folder(folder, files, remove)

    serialization.write_folder = recording_write_folder
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        model = tiny_llama()
        config = CFG_HEADS if job.get("heads") else CFG
        args = training_args(job, out)
        if job.get("rank1_theta_differs"):
            # As if the ranks' RNGs had diverged before injection: the Trainer must start all from rank 0's θ_d.
            # Rank 0 draws it as UniLoraTrainer would (right after seeding with args.seed).
            set_seed(args.seed)
            inject_adapter(model, config)
            config = None
            if rank == 1:
                with torch.no_grad():
                    get_adapter(model).theta_d.uniform_(-0.5, 0.5)
        phase = "construction"
        try:
            trainer = CpuFsdpTrainer(model, args, train_dataset=Tokens(), unilora_config=config)
            phase = "training"
            trainer.train(resume_from_checkpoint=job.get("resume"))
        except (ValueError, RuntimeError) as exc:
            (out / f"error_rank{rank}.txt").write_text(f"{phase}: {type(exc).__name__}: {exc}")
            if job.get("expect_error"):
                return
            raise
        if job["mode"] == "fsdp2":
            # Saving the live, sharded θ_d from one rank must be refused, not write a shard.
            try:
                get_adapter(model).save_adapter(out / "direct")
            except AdapterStateError as exc:
                (out / f"direct_save_rank{rank}.txt").write_text(str(exc))
        trainer.save_model(str(out / "final"))
    finally:
        serialization.write_folder = real_write_folder


def main(path: str) -> None:
    for job in json.loads(Path(path).read_text()):
        run_job(job)


if __name__ == "__main__":
    main(sys.argv[1])
