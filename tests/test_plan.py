"""The plan made before the model loads: steps, batches and what a job may take."""

from types import SimpleNamespace

import pytest

from job import MAX_STEPS, Hyperparameters, JobError
from plan import make_plan


def test_a_job_of_more_steps_than_a_job_may_take_is_refused_before_the_model_loads(tiny_qwen2):
    """60,000 sequences x 20 epochs at batch 1 is 1,200,000 steps: refused by the plan (which comes before the model
    loads) with the figures and the fixes; max_steps within the limit makes the same job acceptable."""
    data = SimpleNamespace(train=[None] * 60_000, packing=False)
    estimate = SimpleNamespace(gradient_checkpointing=False, micro_batch_size=1, gradient_accumulation_steps=1)
    with pytest.raises(JobError) as refused:
        make_plan(data, Hyperparameters(epochs=20, batch_size=1), estimate, 1, "cpu", tiny_qwen2)
    assert str(refused.value).startswith("the job would take 1,200,000 optimizer steps "
                                         "(60,000 sequences at batch_size 1")
    assert f"more than the {MAX_STEPS:,} a job may take" in str(refused.value) and "set max_steps" in str(refused.value)
    plan = make_plan(data, Hyperparameters(epochs=20, batch_size=1, max_steps=MAX_STEPS), estimate, 1, "cpu",
                     tiny_qwen2)
    assert plan.total_steps == MAX_STEPS
