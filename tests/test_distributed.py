"""DPF across real process groups (gloo on CPU, 2 and 3 processes on loopback): DDP and
FSDP2 (fully_shard) keep identical masks on every rank, the sharded threshold equals the
single-process one, DDP matches one process with the combined batch, a sharded run resumes
from a distributed checkpoint, and bad set-ups fail clearly."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dpf_ext
from dpf_ext.schedules import Constant

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")
TIMEOUT = 180
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        dist.destroy_process_group()
    # The work is done and saved: leave without the interpreter's finalization, where gloo's
    # background threads sometimes abort the process (std::terminate on a joinable thread).
    os._exit(0)


def run_ranks(fn, world, tmp_path, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` processes; return their results."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), str(tmp_path), fn, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {TIMEOUT} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _model(kind="mlp"):
    torch.manual_seed(0)
    if kind == "cnn":  # convolutions with a sparse path, the last one the classifier
        return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(), nn.Conv2d(8, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    # the last layer has 2 rows: with 3 ranks one rank holds none of it
    return nn.Sequential(nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 2))


def _batch(step, size=16, kind="mlp"):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 10, generator=g) if kind == "mlp" else torch.randn(size, 2, 4, 4, generator=g)
    return x, (x.reshape(size, -1)[:, 0] > 0).long()


def _masks(model):
    return [m.mask.clone() for _, m in dpf_ext.nn.dpf_layers(model)]


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


SETTINGS = [dict(scope=s, threshold=t, sparsity=0.7)
            for s in ("global", "layer", "filter") for t in ("exact", "approx")]
# the channel floor at work: forced channels globally; in layer scope the first layer's
# budget is exactly one weight per channel
SETTINGS += [dict(scope="global", threshold="exact", sparsity=0.93),
             dict(scope="layer", threshold="exact", sparsity=0.9)]


def _pruner(model, settings):
    settings = dict(settings)
    return dpf_ext.DPF(model, schedule=Constant(settings.pop("sparsity")), **settings)


def _sharded_masks(rank, world):
    out = []
    for settings in SETTINGS:
        model = _shard(dpf_ext.sparsify(_model()))
        pruner = _pruner(model, settings)
        out.append((_masks(model), pruner.report().to_dict()))
    return out


@pytest.mark.filterwarnings("ignore:.*entirely pruned")  # the 2-row classifier, globally
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_threshold_equals_single_process(tmp_path, world):
    results = run_ranks(_sharded_masks, world, tmp_path)
    for i, settings in enumerate(SETTINGS):
        model = dpf_ext.sparsify(_model())
        pruner = _pruner(model, settings)
        expected = _masks(model)
        if settings["sparsity"] > 0.7:
            assert pruner.report().forced > 0, settings
        for rank, per_setting in enumerate(results):
            masks, report = per_setting[i]
            for a, b in zip(masks, expected):
                assert torch.equal(a, b), (settings, rank)
            assert report == pruner.report().to_dict(), (settings, rank)


def _rescaled(model, pruner):
    """The masks after the weights grow by 0.1% and the pruner updates again."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    pruner.update_masks()
    return _masks(model)


def _sharded_warm_masks(rank, world):
    from dpf_ext.methods.first_pass import WarmStart
    WarmStart.pays = lambda self, weights: True  # windows for the small model (this process)
    out = []
    for settings in SETTINGS:
        if settings["threshold"] == "exact" and settings["scope"] != "filter":
            model = _shard(dpf_ext.sparsify(_model()))
            out.append(_rescaled(model, _pruner(model, settings)))
    return out


@pytest.mark.filterwarnings("ignore:.*entirely pruned")
def test_sharded_warm_started_threshold_equals_single_process(tmp_path):
    """The second update starts from the first's threshold: each rank counts the window
    around it and the summarised histogram, summed over the ranks."""
    results = run_ranks(_sharded_warm_masks, 2, tmp_path)
    exact = [s for s in SETTINGS if s["threshold"] == "exact" and s["scope"] != "filter"]
    for i, settings in enumerate(exact):
        model = dpf_ext.sparsify(_model())
        expected = _rescaled(model, _pruner(model, settings))  # no window: too small to pay
        for per_setting in results:
            assert all(torch.equal(a, b) for a, b in zip(per_setting[i], expected)), settings


def _fsdp_train_and_resume(rank, world, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build():
        model = _shard(dpf_ext.sparsify(_model()))
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        pruner = dpf_ext.DPF(model, 0.8, total_steps=12, update_every=2)
        return model, opt, pruner

    def train(model, opt, pruner, steps, history):
        for step in steps:
            x, y = _batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            pruner.step()
            history.append(_masks(model))

    model, opt, pruner = build()
    history = []
    train(model, opt, pruner, range(6), history)
    m_state, o_state = get_state_dict(model, opt)
    dcp.save({"model": m_state, "optim": o_state, "pruner": pruner.state_dict()}, checkpoint_id=ckpt_dir)
    train(model, opt, pruner, range(6, 12), history)
    straight = [p.full_tensor() for p in model.parameters()]

    model, opt, pruner = build()
    m_state, o_state = get_state_dict(model, opt)
    state = {"model": m_state, "optim": o_state, "pruner": pruner.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    pruner.load_state_dict(state["pruner"])
    resumed_history = []
    train(model, opt, pruner, range(6, 12), resumed_history)
    resumed = [p.full_tensor() for p in model.parameters()]
    return {"history": history, "resumed_history": resumed_history, "straight": straight,
            "resumed": resumed, "report": pruner.report().to_dict()}


def test_fsdp_training_keeps_ranks_identical_and_resumes(tmp_path):
    results = run_ranks(_fsdp_train_and_resume, 2, tmp_path, str(tmp_path / "ckpt"))
    r0, r1 = results
    for a, b in zip(r0["history"], r1["history"]):  # every step, every layer
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for r in results:
        for a, b in zip(r["history"][6:], r["resumed_history"]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(r["straight"], r["resumed"]):
            assert torch.equal(a, b)
    assert r0["report"]["reactivated_total"] > 0
    assert abs(r0["report"]["sparsity"] - 0.8) < 1e-3


def _ddp_pruner(model, opt, method, steps):
    if method == "dpf":
        return dpf_ext.DPF(model, 0.8, total_steps=steps, update_every=2)
    return dpf_ext.Pruner(model, method, 0.8, total_steps=steps, update_every=2, optimizer=opt)


def _ddp_train(rank, world, steps, method="dpf", compute="dense", kind="mlp"):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = dpf_ext.sparsify(_model(kind), compute=compute)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pruner = _ddp_pruner(model, opt, method, steps)
    ddp = DDP(model)
    result = _ddp_steps(model, ddp, opt, pruner, rank, world, steps, kind)
    return {**result, "weights": [w.detach().clone() for w in model.parameters()]}


def _ddp_steps(model, ddp, opt, pruner, rank, world, steps, kind="mlp"):
    """Train ``steps`` steps, each rank on its part of the batch; the masks of every step
    and the final report."""
    history = []
    for step in range(steps):
        x, y = _batch(step, 16 * world, kind)
        part = slice(rank * 16, (rank + 1) * 16)
        nn.functional.cross_entropy(ddp(x[part]), y[part]).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        history.append(_masks(model))
    return {"history": history, "report": pruner.report().to_dict()}


@pytest.mark.filterwarnings("ignore:.*entirely pruned")
@pytest.mark.parametrize("method, compute, kind", [
    ("dpf", "dense", "mlp"), ("dpf", "sparse", "mlp"), ("rigl", "sparse", "mlp"),
    ("rigl", "sparse", "cnn")])
def test_ddp_matches_one_process_with_the_combined_batch(tmp_path, method, compute, kind):
    """Each rank on its part of the batch, the products dense or from the kept weights
    (Linear layers, or convolutions and a Linear head): the same masks at every step as one
    process with the whole batch and dense products, and the same weights to float
    tolerance."""
    steps, world = 12, 2
    results = run_ranks(_ddp_train, world, tmp_path, steps, method, compute, kind)
    model = dpf_ext.sparsify(_model(kind))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pruner = _ddp_pruner(model, opt, method, steps)
    for step in range(steps):
        x, y = _batch(step, 16 * world, kind)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        for r in results:
            assert all(torch.equal(a, b) for a, b in zip(r["history"][step], _masks(model))), step
    def without_compute(report):
        return {**report, "layers": [{k: v for k, v in row.items() if k != "compute"}
                                     for row in report["layers"]]}

    for r in results:  # each rank reports the global model once
        assert without_compute(r["report"]) == without_compute(pruner.report().to_dict())
        assert [row["compute"] for row in r["report"]["layers"]] == [compute] * 3
        for got, want in zip(r["weights"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


def _ddp_methods(rank, world, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for method in sorted(dpf_ext.methods.METHODS):
        model = dpf_ext.sparsify(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        x0, y0 = _batch(99, 16)
        options = {"batch_loss": lambda m: nn.functional.cross_entropy(m(x0), y0)} if method == "snip" else {}
        target = None if method == "str" else 0.8  # str's sparsity emerges
        pruner = dpf_ext.Pruner(model, method, target, total_steps=steps,
                             update_every=1 if method in ("deepr", "str") else 2, optimizer=opt, **options)
        ddp = DDP(model)  # after the pruner: the parameters str adds are synchronised too
        out[method] = _ddp_steps(model, ddp, opt, pruner, rank, world, steps)
    return out


def test_every_method_keeps_the_same_masks_on_every_ddp_rank(tmp_path):
    results = run_ranks(_ddp_methods, 2, tmp_path, 10)
    for method, r0 in results[0].items():
        r1 = results[1][method]
        for step, (a, b) in enumerate(zip(r0["history"], r1["history"])):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (method, step)
        assert r0["report"] == r1["report"], method
        if method in ("rigl", "set", "snfs", "dsr", "deepr", "topkast"):  # the masks moved
            assert r0["report"]["reactivated_total"] > 0, method
            assert not all(torch.equal(x, y) for x, y in zip(r0["history"][0], r0["history"][-1]))


def _bad_setups(rank, world):
    errors = {}
    model = dpf_ext.sparsify(_model())
    try:
        dpf_ext.DPF(model, 0.5 + 0.1 * rank, total_steps=10)
    except ValueError as e:
        errors["mismatch"] = str(e)
    sharded = _shard(_model())
    try:
        dpf_ext.sparsify(sharded)
    except ValueError as e:
        errors["order"] = str(e)
    return errors


def test_bad_distributed_setups_fail_clearly(tmp_path):
    for errors in run_ranks(_bad_setups, 2, tmp_path):
        assert "differ across ranks" in errors["mismatch"] and "schedule" in errors["mismatch"]
        assert "before sharding" in errors["order"]


def test_torchrun_example(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "examples" / "distributed.py"),
           "--epochs", "2", "--fsdp"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sparsity" in out.stdout


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5))


def _bn_batch(step, size=12):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(size, 3, 8, 8, generator=g) * (1 + step) + step


def _bn_steps(rank, world, sync=True, steps=3):
    """SGD steps of the BatchNorm model, this rank on its share of each batch, with the
    statistics synchronised or not; the per-step outputs and input gradients, and the final
    state."""
    from dpf_ext.app.sync_batch_norm import synchronize_batch_norm

    model = synchronize_batch_norm(_bn_model()) if sync else _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    outputs = []
    for step in range(steps):
        x = _bn_batch(step).chunk(world)[rank].requires_grad_()
        out = wrapped(x)
        # each rank's mean: DDP averages them into the global batch's mean
        (out * torch.arange(5.0)).square().mean().backward()
        outputs.append((out.detach(), x.grad))
        optimizer.step()
        optimizer.zero_grad()
    return outputs, model.state_dict()


def test_sync_batch_norm_over_two_processes_is_batch_norm_over_the_whole_batch(tmp_path):
    one = _bn_steps(0, 1)
    two = run_ranks(_bn_steps, 2, tmp_path)
    for step, (out, grad) in enumerate(one[0]):
        got = torch.cat([two[r][0][step][0] for r in range(2)])
        got_grad = torch.cat([two[r][0][step][1] for r in range(2)])
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
        # each rank's input gradient is of the sum of the ranks' losses (as torch's own
        # SyncBatchNorm gives): 2x that of the global mean
        torch.testing.assert_close(got_grad, 2 * grad, rtol=1e-4, atol=1e-6)
    for key, value in one[1].items():  # weights and running statistics, on both ranks
        for r in range(2):
            torch.testing.assert_close(two[r][1][key], value, rtol=1e-5, atol=1e-6)
    # the check has teeth: without the synchronisation each process normalises its half
    plain = run_ranks(_bn_steps, 2, tmp_path, False)
    assert not torch.allclose(torch.cat([plain[r][0][0][0] for r in range(2)]), one[0][0][0],
                              atol=1e-3)


def test_sync_batch_norm_in_one_process_is_batch_norm():
    from dpf_ext.app.sync_batch_norm import SyncBatchNorm, synchronize_batch_norm

    model = _bn_model()
    reference = _bn_model()
    synced = synchronize_batch_norm(model)
    assert [type(m) for m in synced.modules()].count(SyncBatchNorm) == 2
    x = _bn_batch(0)
    assert torch.equal(synced(x), reference(x))


def _values_masks(model):
    from dpf_ext.nn import values_storage
    return [values_storage.dense(m)[1] if values_storage.is_values(m) else m.mask.clone()
            for _, m in dpf_ext.nn.dpf_layers(model)]


def _values_run(model, steps, rank=0, world=1, storage="values"):
    from torch.nn.parallel import DistributedDataParallel as DDP

    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pruner = dpf_ext.Pruner(model, "rigl", 0.7, update_every=3, total_steps=steps, optimizer=opt,
                            storage=storage)
    wrapped = DDP(model) if world > 1 else model  # after the pruner: DDP sees the values
    history = []
    for step in range(steps):
        x, y = _batch(step, 16 * world)
        part = slice(rank * 16, (rank + 1) * 16)
        nn.functional.cross_entropy(wrapped(x[part]), y[part]).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        history.append(_values_masks(model))
    from dpf_ext.nn import values_storage
    masked = [values_storage.dense(m)[0] if values_storage.is_values(m) else m.weight * m.mask
              for _, m in dpf_ext.nn.dpf_layers(model)]
    return {"history": history, "report": pruner.report().to_dict(),
            "values": [p.detach().clone() for p in model.parameters()],
            "masked": [w.detach().clone() for w in masked]}


def _ddp_both_storages(rank, world, steps):
    return {storage: _values_run(dpf_ext.sparsify(_model(), compute="sparse"), steps, rank, world,
                                 storage)
            for storage in ("dense", "values")}


def test_values_storage_under_ddp_trains_as_dense_storage_with_the_same_masks_on_every_rank(tmp_path):
    """RigL under DDP (2 ranks): values storage takes the masks dense storage takes at every
    step (the dense gradient of an update step averaged over the ranks), the same on every
    rank, and ends at the same weights."""
    results = run_ranks(_ddp_both_storages, 2, tmp_path, 12)
    for r in results:
        dense, values = r["dense"], r["values"]
        assert values["report"]["reactivated_total"] > 0  # RigL's updates moved the masks
        for step, (got, want) in enumerate(zip(values["history"], dense["history"])):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), step
        assert values["report"] == dense["report"]
        for got, want in zip(values["masked"], dense["masked"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0]["values"]["values"], results[1]["values"]["values"]):
        assert torch.equal(a, b)
