"""Per-step cost of the runtime's own code in a 2-rank gloo world on 127.0.0.1, no Ray (a profiling aid).

A Runner, TermSession and Context are built by hand around the default group, and rank 0 reports the
median wall and thread-CPU time per step, all-reduce calls per step, and the time spent launching and
settling the step's stats all-reduce. Modes: `raw` (the DDP loop alone), `ddp` (the DDP loop inside
ctx.steps), `ctx` (the README loop: ctx.steps, ctx.accumulate, ctx.micro_batches, ctx.report); a
`prof` suffix prints a cProfile of rank 0's elastictrain frames.

    python -m benchmarks._step_profile ctx 210 tiny
    python -m benchmarks._step_profile ctxprof 110 work
"""
import cProfile, pstats, io, os, sys, time, json
from datetime import timedelta
import torch, torch.distributed as dist, torch.multiprocessing as mp

def worker(rank, world, port, mode, steps, kind, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from benchmarks import _common as C
    C.set_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from elastictrain.config import BatchConfig, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from elastictrain.election.election import Election
    from elastictrain.election.store import MemoryStore
    from elastictrain.election.term import WorldPlan
    from elastictrain.election.topology import plan_topology
    from elastictrain.runtime.runner import Runner
    from elastictrain.runtime.spec import RunSpec
    from elastictrain.runtime.world import WorldInfo
    from elastictrain.runtime.session import TermSession
    from elastictrain.runtime.context import Context
    G, M = 128, 32
    spec = RunSpec(run_id="r", namespace="ns", scaling=ScalingConfig(), batch=BatchConfig(global_batch_size=G, micro_batch_size=M),
                   checkpoint=CheckpointConfig(), failure=FailureConfig(), run=RunConfig())
    sent = []
    runner = Runner(f"m{rank}", lambda ctx: None, spec, Election(MemoryStore()), sent.append, {}, torch.device("cpu"))
    members = tuple(f"m{r}" for r in range(world))
    plan = WorldPlan(term=1, leader="m0", members=members, steps=(0,)*world, host="h", port=1)
    w = WorldInfo.from_plan(plan, f"m{rank}")
    runner.world = w
    topo = plan_topology(members)
    ctx = Context(TermSession(runner, w, topo, {"world": dist.group.WORLD}), w, torch.device("cpu"))
    data = C.make_dataset(kind, seed=0)
    model = ctx.prepare_model(C.make_model(kind, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = ctx.state(model=model, optimizer=opt)
    calls = {"all_reduce": 0}
    orig = dist.all_reduce
    def counting(*a, **k):
        calls["all_reduce"] += 1
        return orig(*a, **k)
    dist.all_reduce = counting
    from elastictrain.accumulate import accumulator as A
    tim = {"launch": 0.0, "settle": 0.0}
    def timed(name, fn):
        def w(*a, **k):
            t = time.perf_counter()
            try: return fn(*a, **k)
            finally: tim[name] += time.perf_counter() - t
        return w
    A.AccumulationStep._launch_stats = timed("launch", A.AccumulationStep._launch_stats)
    A.AccumulationStep._settle_stats = timed("settle", A.AccumulationStep._settle_stats)
    prof = cProfile.Profile() if (rank == 0 and mode.endswith("prof")) else None
    times = []; cpu = []
    def body(step):
        if mode.startswith("ddp"):
            opt.zero_grad(set_to_none=True)
            batches = C.micro_batches(data, step, G, M, ctx.rank, ctx.world_size)
            loss = C.ddp_accumulate(model, batches, G)
            opt.step()
        else:
            with ctx.accumulate(model, opt) as acc:
                for batch in ctx.micro_batches(data, step):
                    loss, n = C.loss_sum(model, batch)
                    acc.backward(loss, num_items=n)
            loss = acc.loss
        ctx.report({"loss": float(loss)})
    if mode.startswith("raw"):
        it = range(steps)
    else:
        it = ctx.steps(steps)
    warm = 10
    for step in it:
        if step == warm and prof: prof.enable()
        if step == warm: calls["all_reduce"] = 0; tim.update(launch=0.0, settle=0.0)
        t0 = time.perf_counter(); c0 = time.thread_time()
        if mode.startswith("raw"):
            opt.zero_grad(set_to_none=True)
            batches = C.micro_batches(data, step, G, M, rank, world)
            loss = C.ddp_accumulate(model, batches, G)
            opt.step()
        else:
            body(step)
        times.append(time.perf_counter() - t0); cpu.append(time.thread_time() - c0)
    if prof: prof.disable()
    t = sorted(times[warm:]); c = sorted(cpu[warm:])
    res = dict(mode=mode, rank=rank, med_ms=t[len(t)//2]*1e3, cpu_med_ms=c[len(c)//2]*1e3, cpu_mean_ms=sum(c)/len(c)*1e3,
               all_reduce_per_step=calls["all_reduce"]/(steps-warm), records_sent=len(sent), launch_ms=tim["launch"]/(steps-warm)*1e3, settle_ms=tim["settle"]/(steps-warm)*1e3)
    if rank == 0:
        print(json.dumps(res), flush=True)
        if prof:
            s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats("elastictrain|_common", 40); print(s.getvalue()[:9000])
    dist.destroy_process_group()

if __name__ == "__main__":
    mode = sys.argv[1]; steps = int(sys.argv[2]); kind = sys.argv[3] if len(sys.argv) > 3 else "tiny"
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(worker, args=(2, port, mode, steps, kind, None), nprocs=2, join=True)
