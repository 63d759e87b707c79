"""Mixed fault schedules (without Ray: a fake run view)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from elastictrain.testing.faults import FAULT_KINDS, ChaosFault, ChaosSchedule, chaos_report


class FakeView:
    """A run whose world the test moves by hand; records the signals a schedule sends."""

    def __init__(self, size: int = 3) -> None:
        self.step, self.term = 0, 1
        self.sent: list[tuple[str, int]] = []
        self.noted: list[tuple[str, dict]] = []  # what reached the event stream (`fault_injected` facts)
        self.world(size)

    def world(self, size: int, term=None) -> None:
        self.term = term if term is not None else self.term
        self._members = {f"w{i}": {"rank": i, "term": self.term, "leader": i == 0, "pid": 100 + i, "node_id": f"n{i}"}
                         for i in range(size)}

    def members(self):
        return {m: dict(v) for m, v in self._members.items()}

    def leader(self):
        return next((m for m, v in self._members.items() if v["leader"]), None)

    def signal(self, member, sig, **facts):
        self.sent.append((member, int(sig)))
        self.noted.append((member, facts))
        return 1000.0 + len(self.sent)

    def note_fault(self, member, **facts):
        self.noted.append((member, facts))


class FakeNodes:
    def __init__(self) -> None:
        self.removed, self.added, self.silenced, self.noticed = [], 0, [], []
        self.warning_s = 30.0

    def remove(self, node_id):
        self.removed.append(node_id)

    def add(self):
        self.added += 1

    def silence(self, node_id):
        self.silenced.append(node_id)
        return [4242]

    def notice(self, node_id):
        self.noticed.append(node_id)
        return self.warning_s


def test_mixed_schedule_cycles_every_kind_in_a_seeded_order():
    n = len(FAULT_KINDS)
    a = ChaosSchedule.mixed(count=2 * n, seed=3, full_world=3, checkpoint_every=5, node_ops=FakeNodes())
    b = ChaosSchedule.mixed(count=2 * n, seed=3, full_world=3, checkpoint_every=5, node_ops=FakeNodes())
    kinds = [f.kind for f in a.faults]
    assert kinds == [f.kind for f in b.faults]
    assert sorted(kinds[:n]) == sorted(FAULT_KINDS) and sorted(kinds[n:]) == sorted(FAULT_KINDS)
    with pytest.raises(ValueError, match="node_ops"):
        ChaosSchedule([ChaosFault("node_loss", 0)], full_world=3)
    with pytest.raises(ValueError, match="checkpoint_every"):
        ChaosSchedule([ChaosFault("kill_in_checkpoint", 0)], full_world=3)


def test_faults_wait_for_recovery_and_a_full_world():
    clock = [0.0]
    view = FakeView()
    s = ChaosSchedule([ChaosFault("kill_follower", 0), ChaosFault("kill_leader", 1)], full_world=3, gap_steps=2,
                      clock=lambda: clock[0])
    view.step = 1
    s.on_progress(view)
    assert not view.sent  # not before gap_steps
    view.step = 2
    s.on_progress(view)
    assert view.sent == [("w1", signal.SIGKILL)]
    view.step = 10
    s.on_progress(view)
    assert len(view.sent) == 1  # same term: not recovered yet
    view.world(2, term=2)
    view.step = 13
    s.on_progress(view)
    assert len(view.sent) == 1  # recovered, but the world is not full and the wait has not run out
    clock[0] += s.full_world_wait_s + 1
    s.on_progress(view)
    assert view.sent[-1] == ("w0", signal.SIGKILL)  # the leader, on the smaller world after the wait
    assert [f.term for f in s.fired] == [1, 2]


def test_checkpoint_kill_fires_on_a_save_step_and_node_capacity_returns():
    clock = [0.0]
    view, nodes = FakeView(), FakeNodes()
    s = ChaosSchedule([ChaosFault("node_loss", 0), ChaosFault("kill_in_checkpoint", 1), ChaosFault("hang", 2),
                       ChaosFault("kill_in_rebuild", 3)],
                      full_world=3, gap_steps=1, checkpoint_every=5, node_ops=nodes, readd_after_s=2.0,
                      rebuild_delay_s=0.0, clock=lambda: clock[0])
    view.step = 1
    s.on_progress(view)
    assert nodes.removed == ["n1"] and not view.sent
    clock[0] = 1.0
    s.on_progress(view)
    assert nodes.added == 0
    clock[0] = 2.5
    view.world(3, term=2)
    view.step = 5  # step 5 commits state.step 6: no save due
    s.on_progress(view)
    assert nodes.added == 1 and not view.sent
    view.step = 9  # state.step 10: a save starts now
    s.on_progress(view)
    assert view.sent == [("w0", signal.SIGKILL)]
    view.world(3, term=3)
    view.step = 11
    s.on_progress(view)
    assert view.sent[-1][1] == signal.SIGSTOP
    view.world(3, term=4)
    view.step = 13
    s.on_progress(view)
    assert [sig for _, sig in view.sent[-2:]] == [signal.SIGKILL, signal.SIGKILL]
    assert len({m for m, _ in view.sent[-2:]}) == 2  # two different members


def test_a_silent_node_is_stopped_not_removed_until_its_capacity_comes_back():
    clock = [0.0]
    view, nodes = FakeView(), FakeNodes()
    with pytest.raises(ValueError, match="silence"):
        ChaosSchedule([ChaosFault("silent_node", 0)], full_world=3, node_ops=SimpleNamespace(remove=None, add=None))
    s = ChaosSchedule([ChaosFault("silent_node", 0)], full_world=3, gap_steps=1, node_ops=nodes,
                      readd_after_s=1.0, silent_for_s=5.0, clock=lambda: clock[0])
    view.step = 1
    s.on_progress(view)
    assert nodes.silenced == ["n1"] and not nodes.removed and not view.sent  # no signal to any worker
    assert view.noted == [("w1", {"time": 0.0, "node": "n1", "silenced": True, "fault": "silent_node", "index": 0})]
    assert s.fired[0].detail["stopped"] == 1
    clock[0] = 2.0  # past readd_after_s: a silent node stays silent until silent_for_s
    s.on_progress(view)
    assert not nodes.removed and nodes.added == 0
    clock[0] = 5.5
    s.on_progress(view)
    assert nodes.removed == ["n1"] and nodes.added == 1


def test_a_cloud_notice_reclaims_the_node_once_the_member_left_and_capacity_returns():
    clock = [0.0]
    view, nodes = FakeView(), FakeNodes()
    with pytest.raises(ValueError, match="notice"):
        ChaosSchedule([ChaosFault("notice", 0)], full_world=3, node_ops=SimpleNamespace(remove=None, add=None))
    s = ChaosSchedule([ChaosFault("notice", 0)], full_world=3, gap_steps=1, node_ops=nodes, readd_after_s=2.0,
                      clock=lambda: clock[0])
    view.step = 1
    s.on_progress(view)
    assert nodes.noticed == ["n1"] and not view.sent  # the warning goes through the node's metadata server only
    assert view.noted == [("w1", {"time": 0.0, "node": "n1", "warning_s": 30.0, "fault": "notice", "index": 0})]
    clock[0] = 5.0
    s.on_progress(view)
    assert not nodes.removed  # the member is still saving and leaving
    view._members.pop("w1")
    view.term = 2
    s.on_progress(view)
    assert nodes.removed == ["n1"] and nodes.added == 0  # the member left: the machine goes
    assert s.fired[0].detail["left_before_reclaim"] and s.fired[0].detail["reclaimed_after_s"] == 5.0
    clock[0] = 7.5
    s.on_progress(view)
    assert nodes.added == 1  # capacity back readd_after_s after the reclaim


def test_a_noticed_member_that_never_leaves_loses_its_node_when_the_warning_runs_out():
    clock = [0.0]
    view, nodes = FakeView(), FakeNodes()
    nodes.warning_s = 10.0
    s = ChaosSchedule([ChaosFault("notice", 0)], full_world=3, gap_steps=1, node_ops=nodes, readd_after_s=1.0,
                      clock=lambda: clock[0])
    view.step = 1
    s.on_progress(view)
    clock[0] = 9.9
    s.on_progress(view)
    assert not nodes.removed
    clock[0] = 10.0
    s.on_progress(view)
    assert nodes.removed == ["n1"] and not s.fired[0].detail["left_before_reclaim"]


def test_a_preempted_member_is_terminated_once_the_world_moved_on():
    killed = []
    view = FakeView()
    s = ChaosSchedule([ChaosFault("preempt", 0)], full_world=3, gap_steps=1, clock=lambda: 0.0,
                      kill=lambda pid, sig: killed.append((pid, sig)))
    view.step = 1
    s.on_progress(view)
    assert view.sent == [("w1", signal.SIGTERM)] and not killed
    s.on_progress(view)
    assert not killed  # still in the world: saving and leaving
    view._members.pop("w1")
    view.term = 2
    s.on_progress(view)
    assert killed == [(101, signal.SIGKILL)]


def test_chaos_report_counts_resumes_recovery_and_steps_redone():
    s = ChaosSchedule([], full_world=2)
    s.fired = [ChaosFault("kill_leader", 0, fired_at=10.0, fired_step=4, term=1),
               ChaosFault("kill_follower", 1, fired_at=20.0, fired_step=9, term=2)]
    history = [{"step": i, "term": 1, "time": 5.0 + i} for i in range(6)]  # step 5 committed in term 1 at t=10.5
    history += [{"step": i, "term": 2, "time": 11.0 + i} for i in range(5, 10)]  # step 5 again in term 2
    commits = [(1, i) for i in range(6)] + [(2, i) for i in range(5, 10)]
    rows = chaos_report(s, SimpleNamespace(history=history, commits=commits))
    assert rows[0]["resumed"] and rows[0]["recovery_s"] == pytest.approx(6.0) and rows[0]["steps_redone"] == 1
    assert not rows[1]["resumed"] and rows[1]["recovery_s"] is None and rows[1]["steps_redone"] == 0



def test_every_fault_fired_reaches_the_event_stream_with_its_kind_and_index():
    """`elastictrain report` reads faults from the run's events alone: each fault, node losses included, is a
    `fault_injected` with the schedule's kind and index (a fault on two members: two events, one index)."""
    schedule = ChaosSchedule.mixed(count=7, seed=1, full_world=3, gap_steps=1, checkpoint_every=1,
                                   node_ops=FakeNodes())
    view = FakeView(3)
    for term in range(2, 40):
        if not schedule.pending:
            break
        view.step += 1
        schedule.on_progress(view)
        view.world(3, term=term)
    assert not schedule.pending
    noted = [(facts["fault"], facts["index"]) for _, facts in view.noted]
    expected = [(f.kind, f.index) for f in schedule.fired for _ in f.members]
    assert noted == expected and len({i for _, i in noted}) == 7
