"""MoETrainer: router losses are added exactly (coef x aux, coef x z), scaled right under gradient accumulation,
logged apart from the LM loss, and training works for a softmax family and a sigmoid family without model aux."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from moetune.config import MoESection
from moetune.tiny import build_tokenizer, tiny_config
from moetune.trainer import MoETrainer


TOKENIZER = build_tokenizer()
DATA = Dataset.from_dict({"text": [f"def f{i}(x):\n    return x * {i} + {i % 3}" * (1 + i % 3) for i in range(16)]})


def _trainer(arch, tmp_path, moe: MoESection, **args) -> MoETrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(TOKENIZER)))
    config = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        per_device_train_batch_size=4, max_length=64, logging_steps=1, save_strategy="no", learning_rate=1e-3,
        **args,
    )
    return MoETrainer(model=model, args=config, train_dataset=DATA, processing_class=TOKENIZER, moe=moe)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_router_losses_are_added_exactly(arch, tmp_path):
    trainer = _trainer(arch, tmp_path, MoESection(aux_loss_coef=0.0, router_fp32=False, telemetry=False))
    trainer.model.train()
    batch = _batch(trainer)
    base = trainer.compute_loss(trainer.model, dict(batch)).detach()
    assert not trainer.router_capture.logits  # compute_loss drops the captured logits (and their graph)
    trainer.aux_coef = 0.25
    with_aux = trainer.compute_loss(trainer.model, dict(batch)).detach()
    aux = trainer._metrics["train"]["aux_loss"][-1]
    assert float(with_aux - base) == pytest.approx(0.25 * aux, rel=1e-4)
    trainer.aux_coef, trainer.moe.z_loss_coef = 0.0, 0.5
    with_z = trainer.compute_loss(trainer.model, dict(batch)).detach()
    z = trainer._metrics["train"]["z_loss"][-1]
    assert float(with_z - base) == pytest.approx(0.5 * z, rel=1e-4)
    assert aux > 1.0 and z > 0.0  # real values: a balanced 4-expert top-2 router gives aux ~= 2


@pytest.mark.parametrize("items_given", [False, True])
def test_gradient_accumulation_scaling(tmp_path, items_given):
    """What training_step backpropagates per micro-batch: LM part + coef * aux / GA, whichever way Trainer
    normalizes the LM loss (divides it itself, or leaves it to num_items_in_batch)."""
    trainer = _trainer("qwen3_moe", tmp_path, MoESection(aux_loss_coef=0.0, router_fp32=False, telemetry=False),
                       gradient_accumulation_steps=4)
    trainer.current_gradient_accumulation_steps = 4
    batch = _batch(trainer)
    items = batch["labels"].ne(-100).sum() * 4 if items_given else None
    base = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=items)
    trainer.aux_coef = 0.5
    with_aux = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=items)
    aux = trainer._metrics["train"]["aux_loss"][-1]
    assert float(with_aux - base) == pytest.approx(0.5 * aux / 4, rel=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_trains_with_accumulation_and_logs(arch, tmp_path):
    trainer = _trainer(arch, tmp_path, MoESection(aux_loss_coef=0.01, z_loss_coef=0.001, expert_dropout=0.1,
                                                   router_jitter=0.01), max_steps=3, gradient_accumulation_steps=2)
    router = next(p for n, p in trainer.model.named_parameters() if n.endswith("mlp.gate.weight"))
    before = router.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for entry in logs:
        assert entry["aux_loss"] > 1.0 and entry["z_loss"] > 0.0
        assert 0.0 < entry["routing/max_share"] <= 1.0 / 2 + 1e-6  # top-2: one expert holds at most half the slots
    means = trainer.router_loss_means()
    assert means["aux_loss"] == pytest.approx(sum(e["aux_loss"] for e in logs) / 3, rel=1e-6)
    assert not torch.equal(router.detach(), before)
    report = json.loads((tmp_path / "routing.json").read_text())
    assert report["model_type"] == arch and report["tokens"] > 0
    assert (tmp_path / "routing.png").exists()


def test_aux_off_and_model_aux_disabled(tmp_path):
    trainer = _trainer("mixtral", tmp_path, MoESection(aux_loss=False, telemetry=False))
    assert trainer.aux_coef == 0.0 and not trainer.aux_loss_enabled
    assert trainer.model.config.output_router_logits is False  # the model does not add its own aux either
    trainer.model.train()
    batch = _batch(trainer)
    out = trainer.model(**{k: v for k, v in batch.items()})
    assert out.aux_loss is None


def test_default_coefficient_is_the_models(tmp_path):
    trainer = _trainer("olmoe", tmp_path, MoESection(telemetry=False))
    assert trainer.aux_coef == pytest.approx(0.01)  # OLMoE's own default
    trainer = _trainer("deepseek_v3", tmp_path, MoESection(telemetry=False))
    assert trainer.aux_coef == pytest.approx(0.001)  # no default in the family: moetune's
