"""A driver for the lost-driver test: the toy task on the cluster named by RAY_ADDRESS, checkpointing to
the URI given; prints one JSON line with what the run did. Run as `python -m tests.integration.lost_driver URI`."""

from __future__ import annotations

import json
import sys

import elastictrain as et
from elastictrain.testing.toy import ToyTask, make_train_fn
from tests.toy_runs import BATCH, FAILURE, assert_matches_one_process

TASK = ToyTask(total_steps=40, step_sleep_s=0.1)
EVERY = 5


def main(uri: str) -> int:
    result = et.ElasticTrainer(
        make_train_fn(TASK), scaling=et.ScalingConfig(min_workers=1, max_workers=2), batch=BATCH, failure=FAILURE,
        checkpoint=et.CheckpointConfig(uri=uri, every_steps=EVERY),
    ).fit()
    try:
        assert_matches_one_process(result, TASK)
        matches = True
    except AssertionError:
        matches = False
    restored = [e["step"] for e in result.events if e["kind"] == "restored_from_checkpoint"]
    print(json.dumps({"steps": result.steps, "restored": restored, "matches": matches}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
