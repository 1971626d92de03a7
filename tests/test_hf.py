"""The transformers Trainer callback and accelerate's checkpoints: a run interrupted at a
checkpoint and resumed ends as the uninterrupted run; a checkpoint folder loads through
``from_pretrained`` as the sparse model."""

import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import dpf_ext

transformers = pytest.importorskip("transformers")
from dpf_ext.hf import DPFCallback  # noqa: E402

STEPS, SAVE_EVERY, UPDATE_EVERY = 40, 12, 8


# the example's generated task (16 tokens of 5..11; does 7 occur more often than 8?)
CountingTask = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples"
                                  / "trainer_bert.py"))["CountingTask"]


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    return dpf_ext.sparsify(transformers.BertForSequenceClassification(config))


class StopAt(transformers.TrainerCallback):
    """Ends training after step ``step``, as a preemption would (no checkpoint taken)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Snapshot(transformers.TrainerCallback):
    """Records the pruned model's weights (``mask ⊙ w``) after step ``step``."""

    def __init__(self, callback: DPFCallback, step: int):
        self.callback, self.step, self.weights = callback, step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {name: layer.masked_weight().detach().clone()
                            for name, layer in self.callback.pruner.layers}


def train(out, *extra, resume=None, dpf=True, method=None):
    """A Trainer run of :func:`bert` (``finalize=None``: the dense weights and masks stay);
    returns the model and the DPF callback."""
    model = bert()
    options = {} if method is None else {"method": method}
    callback = DPFCallback(0.8, finalize=None, update_every=UPDATE_EVERY, **options) if dpf else None
    callbacks = [c for c in (callback, *(e(callback) if callable(e) else e for e in extra)) if c]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=16,
            learning_rate=1e-3, save_strategy="steps", save_steps=SAVE_EVERY, report_to=[],
            use_cpu=True, seed=0, disable_tqdm=True, logging_steps=10),
        train_dataset=CountingTask(512, 0),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, callback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    snapshots = []

    def snapshot(callback):
        snapshots.append(Snapshot(callback, SAVE_EVERY))
        return snapshots[-1]

    model, callback = train(out, snapshot)
    return out, model, callback, snapshots[0].weights


def _same_run(model, callback, ref_model, ref_callback):
    for (name, layer), (_, ref) in zip(callback.pruner.layers, ref_callback.pruner.layers):
        assert torch.equal(layer.mask, ref.mask), name
        assert torch.equal(layer.dense_weight, ref.dense_weight), name
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, ref), name
    report, ref_report = callback.pruner.report(), ref_callback.pruner.report()
    assert report.sparsity == ref_report.sparsity == pytest.approx(0.8, abs=1e-3)
    assert [r.reactivated_total for r in report.layers] == [r.reactivated_total for r in ref_report.layers]
    assert ref_report.reactivated_total > 0  # the statistics are not trivially equal
    assert callback.pruner.step_count == STEPS


@pytest.mark.parametrize("stop", [SAVE_EVERY + 2, SAVE_EVERY + UPDATE_EVERY],
                         ids=["no-update-before-stop", "mask-update-before-stop"])
def test_a_resumed_trainer_run_ends_as_the_uninterrupted_one(uninterrupted, tmp_path, stop):
    ref_out, ref_model, ref_callback, _ = uninterrupted
    model, callback = train(tmp_path, StopAt(stop))
    assert callback.pruner.step_count == stop
    assert not (tmp_path / f"checkpoint-{stop}").exists()  # the stop lost steps since the checkpoint
    model, callback = train(tmp_path, resume=str(tmp_path / f"checkpoint-{SAVE_EVERY}"))
    _same_run(model, callback, ref_model, ref_callback)


def test_a_resumed_rigl_run_ends_as_the_uninterrupted_one(tmp_path):
    ref_model, ref_callback = train(tmp_path / "ref", method="rigl")
    assert ref_callback.pruner.report().method == "rigl"
    stop = SAVE_EVERY + UPDATE_EVERY  # a drop-and-grow update between the checkpoint and the stop
    train(tmp_path / "run", StopAt(stop), method="rigl")
    model, callback = train(tmp_path / "run", resume=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"),
                            method="rigl")
    _same_run(model, callback, ref_model, ref_callback)


def test_a_checkpoint_folder_loads_as_the_sparse_model(uninterrupted):
    out, _, _, pruned = uninterrupted
    plain = transformers.BertForSequenceClassification.from_pretrained(out / f"checkpoint-{SAVE_EVERY}")
    assert not any(isinstance(m, dpf_ext.DPFLayer) for m in plain.modules())
    zeros = total = 0
    for name, weight in pruned.items():
        loaded = plain.get_submodule(name).weight
        assert torch.equal(loaded, weight), name
        zeros += int((loaded == 0).sum())
        total += loaded.numel()
    assert zeros / total > 0.3  # step 12 of a cubic ramp to 80% at step 30: about 58%


def test_resuming_without_the_pruner_state_is_an_error(tmp_path):
    train(tmp_path, StopAt(SAVE_EVERY), dpf=False)
    with pytest.raises(ValueError, match="without the DPF pruner's state"):
        train(tmp_path, resume=str(tmp_path / f"checkpoint-{SAVE_EVERY}"))


def test_restoring_callbacks_by_copy_is_refused(tmp_path):
    model = bert()
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[],
                                            use_cpu=True, restore_callback_states_from_checkpoint=True),
        train_dataset=CountingTask(8, 0), callbacks=[DPFCallback(0.5, update_every=1)])
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        trainer.train()


def test_sparse_state_dict_form_round_trips_and_loads_plain_as_sparse():
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    pruner = dpf_ext.DPF(model, schedule=dpf_ext.schedules.Constant(0.6))
    with torch.no_grad():
        model[0].weight[~model[0].mask] = torch.tensor(-0.0)  # -0.0 pruned values survive too
    dpf_ext.nn.set_state_dict_form(model, "sparse")
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias", "0.mask", "0.weight_pruned",
                          "2.weight", "2.bias", "2.mask", "2.weight_pruned"}
    for i in (0, 2):
        assert torch.equal(state[f"{i}.weight"], model[i].weight * model[i].mask)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    result = plain.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == ["0.mask", "0.weight_pruned", "2.mask", "2.weight_pruned"]
    assert torch.equal(plain[2].weight, model[2].weight * model[2].mask)
    again = dpf_ext.sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    again.load_state_dict(state)
    for a, b in zip(list(again.parameters()) + list(again.buffers()),
                    list(model.parameters()) + list(model.buffers())):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    assert pruner.sparsity() == pytest.approx(0.6, abs=0.05)
    with pytest.raises(ValueError, match="form must be one of"):
        dpf_ext.nn.set_state_dict_form(model, "compact")


def test_accelerate_save_and_load_state_resume_exactly(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 10, generator=data), torch.randint(0, 4, (16,), generator=data))
               for _ in range(24)]

    def run(start, stop, save=None, load=None):
        torch.manual_seed(0)
        model = dpf_ext.sparsify(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        accelerator = accelerate.Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        pruner = dpf_ext.DPF(model, 0.9, total_steps=24, update_every=4)
        accelerator.register_for_checkpointing(pruner)
        if load:
            accelerator.load_state(load)
        for x, y in batches[start:stop]:
            optimizer.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            pruner.step()
            if save and pruner.step_count == save[0]:
                accelerator.save_state(save[1])
        return model, pruner

    ref_model, ref = run(0, 24, save=(10, tmp_path / "ckpt"))
    model, pruner = run(10, 24, load=tmp_path / "ckpt")
    assert pruner.step_count == 24 and pruner.report().reactivated_total == ref.report().reactivated_total
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_trainer_run_on_values_storage_trains_as_dense_storage(tmp_path):
    """RigL through the callback with ``storage="values"`` (BERT's Linear layers keep their
    kept values only) takes the masks of the same run on dense storage with the sparse
    products, and ends at the same pruned weights."""
    runs = {}
    for storage in ("dense", "values"):
        model = bert()
        dpf_ext.nn.set_compute(model, "sparse")
        callback = DPFCallback(0.8, finalize="fold", update_every=UPDATE_EVERY, method="rigl",
                               storage=storage)
        transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path / storage), max_steps=STEPS, per_device_train_batch_size=16,
                learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True),
            train_dataset=CountingTask(512, 0), callbacks=[callback]).train()
        runs[storage] = (callback.report, {n: l.dense_weight.detach().clone()
                                           for n, l in callback.pruner.layers})
    (dense_report, dense), (values_report, values) = runs["dense"], runs["values"]
    assert values_report.reactivated_total == dense_report.reactivated_total > 0
    assert [r.kept for r in values_report.layers] == [r.kept for r in dense_report.layers]
    for name, weight in dense.items():
        torch.testing.assert_close(values[name], weight, rtol=1e-4, atol=1e-6)
