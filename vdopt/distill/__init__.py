"""`vdopt distill`: few-step, guidance-free student weights from a guided teacher (issue 5).

    vdopt distill recipe.yaml teacher.safetensors -o student/

runs three resumable stages into `student/`:

1. `trajectories/` -- the teacher's guided ODE solutions at the student's key points (trajectories.py);
2. `checkpoints/` -- training: trajectory loss + adversarial loss on teacher features, EMA (train.py);
3. `student.safetensors` + `recipe.yaml` -- the EMA weights, their schedule, and a recipe that applies
   them with the `reduce_steps` pass (export.py).

Rerunning the same command resumes: complete shards are skipped, training continues from the newest
checkpoint, export is redone. `torchrun --nproc_per_node N -m vdopt.distill.cli ...` runs the same on N
processes (gloo).
"""



def __getattr__(name: str):
    # lazy, so `python -m vdopt.distill.cli` does not import the module twice
    if name in ("distill", "main", "register"):
        from vdopt.distill import cli

        return getattr(cli, name)
    raise AttributeError(name)
